//! Generates the device-plugin API v1beta1 from `proto/api.proto` without a system `protoc`:
//! `$OUT_DIR/api.rs` (messages, protobuf 3.7.2 pure-Rust codegen) and `$OUT_DIR/api_grpc.rs`
//! (grpcio client/server stubs, from a descriptor set re-read as protobuf 2, which is what
//! grpcio-compiler 0.13 takes). `include!` rejects inner attributes, so they are stripped.

use std::fs;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use protobuf2::Message as _;

const PROTO: &str = "proto/api.proto";

fn main() {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));

    protobuf_codegen::Codegen::new()
        .pure()
        .includes(["proto"])
        .input(PROTO)
        .out_dir(&out)
        .run()
        .expect("protobuf codegen");
    strip_inner_attributes(&out.join("api.rs"));

    let parsed = protobuf_parse::Parser::new()
        .pure()
        .includes(["proto"])
        .input(PROTO)
        .file_descriptor_set()
        .expect("parse proto");
    let bytes = parsed.write_to_bytes().expect("encode descriptor set");
    let set = protobuf2::descriptor::FileDescriptorSet::parse_from_bytes(&bytes)
        .expect("re-read descriptor set as protobuf 2");
    let wanted = vec!["api.proto".to_string()];
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
