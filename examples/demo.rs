//! The main job end to end, with no cluster: mock device nodes in a temp tree, the real plugin
//! binary, and our fake kubelet (real gRPC over real unix sockets). Run by `scripts/demo.sh`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::time::Instant;

use common::{alloc_request, opt, plugin_client, FakeKubelet, Host, Plugin, WAIT};
use protobuf::text_format::print_to_string_pretty;

fn section(title: &str) {
    println!("\n=== {title}");
}

fn main() {
    let started = Instant::now();
    let host = Host::new("demo");
    fs::write(host.root().join("dev/knem"), b"").unwrap();
    section("mock host");
    println!("host root   {}", host.root().display());
    println!("plugin dir  {}", host.plugin_dir().display());
    println!("nodes       dev/infiniband/{{uverbs0,uverbs1,rdma_cm}}, dev/knem (plain files)");

    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut plugin = Plugin::start(&host, &[]);
    println!("binary      {}", common::plugin_bin().display());

    section("RegisterRequest received by the fake kubelet (after its dial-back answered)");
    let (req, dialed) = kubelet.expect_registered();
    print!("{}", print_to_string_pretty(&req));
    println!(
        "dial-back GetDevicePluginOptions: {}",
        print_to_string_pretty(&dialed).trim()
    );

    section("first ListAndWatch message");
    print!("{}", print_to_string_pretty(&kubelet.expect_list()));

    section("Allocate for one container requesting rdma-0");
    let client = plugin_client(&host.socket());
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .expect("Allocate");
    print!("{}", print_to_string_pretty(&resp));

    section("Allocate naming an unknown device ID");
    match client.allocate_opt(&alloc_request(&[&["mlx5_0"]]), opt()) {
        Err(e) => println!("refused: {e}"),
        Ok(r) => println!("unexpectedly granted: {r:?}"),
    }

    section("hot-plug: the driver removes every uverbs node, then one comes back");
    host.remove_node("uverbs0");
    host.remove_node("uverbs1");
    let list = kubelet.expect_health("Unhealthy");
    println!(
        "kubelet sees: {} {}",
        list.devices[0].ID, list.devices[0].health
    );
    host.add_node("uverbs0");
    let list = kubelet.expect_health("Healthy");
    println!(
        "kubelet sees: {} {}",
        list.devices[0].ID, list.devices[0].health
    );

    section("SIGTERM");
    plugin.signal(libc::SIGTERM);
    let status = plugin.wait_exit(WAIT).expect("plugin exits");
    println!(
        "plugin exited with {status}; socket removed: {}",
        !host.socket().exists()
    );

    section("plugin log");
    print!("{}", plugin.log_text());
    drop(kubelet);
    drop(plugin);
    let tree = host.tmp.path().to_path_buf();
    drop(host);
    println!(
        "\ndemo done in {:.2?}; temp tree {} removed: {}",
        started.elapsed(),
        tree.display(),
        !tree.exists()
    );
    if !status.success() {
        std::process::exit(1);
    }
}
