//! The DRA front-end's figures: the real binary with `--frontend dra` against the test suite's
//! fake DRA kubelet and fake API server (plain HTTP on 127.0.0.1, so the figures are ours and
//! the loopback's, not a real API server's).

use std::time::{Duration, Instant};

use crate::common::dra_kubelet::{plugin_args, DraKubelet};
use crate::common::fake_api::FakeApi;
use crate::common::*;
use crate::{ms, process_figures, summary, Row};
use rdma_plugin::host::mock;
use serde_json::{json, Value};

const NODE: &str = "bench-node";
const DRIVER: &str = "rdma.jarvice.com";

fn start(host: &Host, api: &FakeApi, extra: &[&str]) -> Plugin {
    let mut args = plugin_args(host, api, NODE);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Plugin::start_with(host, &args, |cmd| {
        cmd.env("RUST_LOG", "info");
    })
}

fn uid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

fn slice_with(api: &FakeApi, want: impl Fn(&Value) -> bool) -> bool {
    api.wait_for(WAIT, |api| api.slices().into_iter().find(|s| want(s)))
        .is_some()
}

fn tainted(s: &Value, device: &str) -> bool {
    s["spec"]["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["name"] == device))
        .is_some_and(|d| d["taints"].is_array())
}

pub fn figures(rows: &mut Vec<Row>) {
    let host = Host::with_hcas("bench-dra");
    let api = FakeApi::start(false, host.tmp.path());
    api.add_node(NODE);
    let kubelet = DraKubelet::start(&host.tmp.path().join("registry"));
    let t0 = Instant::now();
    let plugin = start(
        &host,
        &api,
        &[
            "--resource",
            "jarvice.com/rdma-hca,mode=per-hca",
            "--health-interval",
            "0.5",
            "--hold-down",
            "2",
        ],
    );
    assert!(slice_with(&api, |_| true));
    let published = ms(t0.elapsed());
    kubelet.expect_registration(1);
    rows.push(Row {
        what: "DRA: start -> ResourceSlice in the API server (3 HCAs)".into(),
        value: format!("{published:.1} ms"),
        target: "",
    });

    // Prepare with the claim fetch, then the repeat answered from the record, then unprepare.
    let n = 200;
    for i in 0..n {
        let device = ["mlx5-0", "mlx5-1", "mlx5-2"][i % 3];
        api.put_claim(json!({
            "metadata": {"namespace": "bench", "name": format!("c{i}"), "uid": uid(i)},
            "status": {"allocation": {"devices": {"results": [
                {"request": "r", "driver": DRIVER, "pool": NODE, "device": device}
            ]}}},
        }));
    }
    let claims: Vec<(String, String)> = (0..n).map(|i| (format!("c{i}"), uid(i))).collect();
    let mut first = Vec::new();
    let mut again = Vec::new();
    let mut unprep = Vec::new();
    for (name, u) in &claims {
        let c = [("bench", name.as_str(), u.as_str())];
        let t = Instant::now();
        let r = kubelet.prepare(&c).expect("prepare");
        first.push(ms(t.elapsed()));
        assert_eq!(r.claims[u.as_str()].error, "");
        let t = Instant::now();
        kubelet.prepare(&c).expect("prepare again");
        again.push(ms(t.elapsed()));
        let t = Instant::now();
        kubelet.unprepare(&c).expect("unprepare");
        unprep.push(ms(t.elapsed()));
    }
    rows.push(Row {
        what: "DRA: NodePrepareResources, 1 claim, with the claim's GET (fake API server)".into(),
        value: summary(first),
        target: "well within the kubelet's 45 s",
    });
    rows.push(Row {
        what: "DRA: NodePrepareResources repeated (answered from the spec file)".into(),
        value: summary(again),
        target: "",
    });
    rows.push(Row {
        what: "DRA: NodeUnprepareResources, 1 claim".into(),
        value: summary(unprep),
        target: "",
    });

    // Port down -> taint in the slice, beyond the hold-down; back -> taint gone.
    let hold = 2000.0;
    let mut down = Vec::new();
    let mut up = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
        assert!(slice_with(&api, |s| tainted(s, "mlx5-0")));
        down.push(ms(t.elapsed()) - hold);
        let t = Instant::now();
        host.set_port("mlx5_0", 1, mock::ACTIVE);
        assert!(slice_with(&api, |s| !tainted(s, "mlx5-0")));
        up.push(ms(t.elapsed()));
    }
    rows.push(Row {
        what: "DRA: port DOWN -> NoSchedule taint in the slice, beyond the 2 s hold-down (--health-interval 0.5)".into(),
        value: summary(down),
        target: "<= one interval (500 ms)",
    });
    rows.push(Row {
        what: "DRA: port back ACTIVE -> taint gone from the slice".into(),
        value: summary(up),
        target: "<= one interval (500 ms)",
    });

    // The kubelet's start: it wipes the node's slices and registers the driver again.
    let mut back = Vec::new();
    for _ in 0..5 {
        assert!(slice_with(&api, |_| true));
        api.wipe_slices(NODE, None);
        let t = Instant::now();
        kubelet.register_again();
        assert!(slice_with(&api, |_| true));
        back.push(ms(t.elapsed()));
    }
    rows.push(Row {
        what: "DRA: slice wiped + kubelet registers again -> slice published again".into(),
        value: summary(back),
        target: "< 100 ms (checked at once after a registration)",
    });

    // Idle, serving, health stream open: what DRA costs a node.
    let mut health = kubelet.watch_health();
    health.next(WAIT);
    std::thread::sleep(Duration::from_secs(1));
    let (_, _, before) = process_figures(plugin.pid());
    std::thread::sleep(Duration::from_secs(10));
    let (rss, threads, after) = process_figures(plugin.pid());
    rows.push(Row {
        what: "DRA idle, serving, health stream open: RSS / threads / wake-ups in 10 s".into(),
        value: format!(
            "{:.2} MiB / {threads} / {}",
            rss as f64 / 1024.0,
            // Threads that exited meanwhile take their counts with them.
            after.saturating_sub(before)
        ),
        target: "(reads ports every --health-interval, health resent every 10 s)",
    });
    drop(health);
}
