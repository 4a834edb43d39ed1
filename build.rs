//! Generates the kubelet APIs from `proto/` without a system `protoc`: for each `<name>.proto`,
//! `$OUT_DIR/<name>.rs` (messages, protobuf 3.7.2 pure-Rust codegen) and `$OUT_DIR/<name>_grpc.rs`
//! (grpcio client/server stubs, from a descriptor set re-read as protobuf 2, which is what
//! grpcio-compiler 0.13 takes). `include!` rejects inner attributes, so they are stripped.
//! The device-plugin API (`api.proto`) always; the DRA ones (plugin registration, DRA v1, DRA
//! health) are small enough to generate whether or not the `dra` feature uses them.

use std::fs;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use protobuf2::Message as _;

const PROTOS: [&str; 4] = ["api", "pluginregistration", "dra", "dra_health"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    for name in PROTOS {
        generate(&out, name);
    }
}

fn generate(out: &Path, name: &str) {
    let proto = format!("proto/{name}.proto");
    println!("cargo:rerun-if-changed={proto}");

    protobuf_codegen::Codegen::new()
        .pure()
        .includes(["proto"])
        .input(&proto)
        .out_dir(out)
        .run()
        .expect("protobuf codegen");
    strip_inner_attributes(&out.join(format!("{name}.rs")));

    let parsed = protobuf_parse::Parser::new()
        .pure()
        .includes(["proto"])
        .input(&proto)
        .file_descriptor_set()
        .expect("parse proto");
    let bytes = parsed.write_to_bytes().expect("encode descriptor set");
    let set = protobuf2::descriptor::FileDescriptorSet::parse_from_bytes(&bytes)
        .expect("re-read descriptor set as protobuf 2");
    let wanted = vec![format!("{name}.proto")];
    for file in grpcio_compiler::codegen::gen(set.get_file(), &wanted) {
        let path = out.join(&file.name);
        fs::write(&path, file.content).expect("write grpc code");
        strip_inner_attributes(&path);
    }
}

fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path).expect("read generated code");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
        .collect();
    fs::write(path, kept.join("\n")).expect("rewrite generated code");
}
