//! The main job end to end, with no cluster: mock device nodes in a temp tree, the real plugin
//! binary, and our fake kubelet (real gRPC over real unix sockets). Run by `scripts/demo.sh`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::time::Instant;

use common::{alloc_request, opt, plugin_client, plugin_command, FakeKubelet, Host, Plugin, WAIT};
use protobuf::text_format::print_to_string_pretty;
use rdma_plugin::host::mock;

fn section(title: &str) {
    println!("\n=== {title}");
}

fn main() {
    let started = Instant::now();
    let host = Host::with_hcas("demo");
    fs::write(host.root().join("dev/knem"), b"").unwrap();
    section("mock host");
    println!("host root   {}", host.root().display());
    println!(
        "sysfs       {} (laid out as the kernel does, symlinks included)",
        host.sys().display()
    );
    println!("plugin dir  {}", host.plugin_dir().display());
    println!("HCAs        mlx5_0 (InfiniBand, uverbs1), mlx5_1 (InfiniBand, uverbs0), mlx5_2 (RoCE, uverbs2)");
    println!("nodes       dev/infiniband/{{uverbs0,uverbs1,uverbs2,rdma_cm,umad*,issm*}}, dev/knem (plain files)");

    // InfiniBand only (the RoCE NIC carries the management network); fast health readings so
    // the demo is short.
    let flags = [
        "--link-layer",
        "infiniband",
        "--health-interval",
        "0.2",
        "--hold-down",
        "1",
    ];
    section("`list --link-layer infiniband`: every HCA, what is granted, health");
    let out = plugin_command()
        .arg("list")
        .args(&flags[..2])
        .args(host.args())
        .output()
        .expect("run list");
    print!("{}", String::from_utf8_lossy(&out.stdout));

    let kubelet = FakeKubelet::start(&host.plugin_dir());
    // Metrics on a port the kernel picks (the log says which), for the scrape below.
    let mut serve_flags = flags.to_vec();
    if cfg!(feature = "metrics") {
        serve_flags.extend(["--metrics-address", "127.0.0.1:0"]);
    }
    let mut plugin = Plugin::start(&host, &serve_flags);
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

    section("port health: both InfiniBand ports go down (hold-down 1 s), then one comes back");
    let t0 = Instant::now();
    host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
    host.set_port("mlx5_1", 1, mock::DOWN_POLLING);
    let list = kubelet.expect_health("Unhealthy");
    println!(
        "kubelet sees: {} {} after {:.2?}",
        list.devices[0].ID,
        list.devices[0].health,
        t0.elapsed()
    );
    let t0 = Instant::now();
    host.set_port("mlx5_1", 1, mock::ACTIVE);
    let list = kubelet.expect_health("Healthy");
    println!(
        "kubelet sees: {} {} after {:.2?}",
        list.devices[0].ID,
        list.devices[0].health,
        t0.elapsed()
    );
    host.set_port("mlx5_0", 1, mock::ACTIVE);

    #[cfg(feature = "metrics")]
    {
        section("what Prometheus scrapes from --metrics-address (a few of the lines)");
        let addr = common::scrape::metrics_addr(&plugin);
        let (_, body) = common::scrape::http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        let wanted = [
            "jarvice_rdma_port_up{",
            "jarvice_rdma_resource_devices",
            "jarvice_rdma_registered{",
            "jarvice_rdma_health_transitions_total{",
            "jarvice_rdma_requests_total{",
        ];
        for line in body.lines() {
            if wanted.iter().any(|w| line.starts_with(w)) {
                println!("{line}");
            }
        }
        println!(
            "(curl http://{addr}/metrics: {} lines in all)",
            body.lines().count()
        );
    }

    section("`diagnose`: one line per check, with fixes");
    let out = plugin_command()
        .arg("diagnose")
        .args(&flags[..2])
        .args(host.args())
        .output()
        .expect("run diagnose");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("(exit status {})", out.status);

    section("hot-plug: the driver removes every uverbs node, then one comes back");
    host.remove_node("uverbs0");
    host.remove_node("uverbs1");
    host.remove_node("uverbs2");
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
