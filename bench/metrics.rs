//! The metrics endpoint's rows: scrape latency with 16 dual-port HCAs and 4 resources, and the
//! idle figures with metrics on beside the same plugin without them (a scrape is served on its
//! own thread, which sleeps in `poll` with no timeout between scrapes: no wake-ups of ours).

use std::time::Instant;

use super::common::scrape::{metrics_addr, scrape};
use super::common::*;
use super::{idle_figures, ms, sixteen_hcas, summary, Row};

const RESOURCES: [&str; 4] = [
    "jarvice.com/rdma",
    "jarvice.com/rdma4,shares=4",
    "jarvice.com/ib,mode=per-hca,hcas=mlx5_0;mlx5_1;mlx5_2;mlx5_3;mlx5_4;mlx5_5;mlx5_6;mlx5_7",
    "jarvice.com/ib2,mode=per-hca,hcas=mlx5_8;mlx5_9;mlx5_10;mlx5_11;mlx5_12;mlx5_13;mlx5_14;mlx5_15",
];

fn start(host: &Host, metrics: bool) -> (FakeKubelet, Plugin) {
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut args: Vec<&str> = RESOURCES.iter().flat_map(|r| ["--resource", r]).collect();
    if metrics {
        args.extend(["--metrics-address", "127.0.0.1:0"]);
    }
    let plugin = Plugin::start_with(host, &args, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    for _ in RESOURCES {
        kubelet.expect_registered();
    }
    (kubelet, plugin)
}

pub fn figures(rows: &mut Vec<Row>) {
    let host = sixteen_hcas("bench-metrics");
    let (_kubelet, plugin) = start(&host, true);
    let addr = metrics_addr(&plugin);
    scrape(addr);
    let mut samples = Vec::new();
    let mut size = 0;
    for _ in 0..200 {
        let t0 = Instant::now();
        let s = scrape(addr);
        samples.push(ms(t0.elapsed()));
        size = s.samples.len();
    }
    rows.push(Row {
        what: format!("scrape /metrics, 16 HCAs, 4 resources ({size} samples), over TCP"),
        value: summary(samples),
        target: "< 10 ms",
    });
    idle_figures(
        &plugin,
        "with --metrics-address, 16 HCAs, 4 resources",
        rows,
    );
    drop(plugin);
    let host = sixteen_hcas("bench-metrics-off");
    let (_kubelet, plugin) = start(&host, false);
    idle_figures(&plugin, "without metrics, 16 HCAs, 4 resources", rows);
}
