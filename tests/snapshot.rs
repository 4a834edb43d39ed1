//! One reading of the host, shared: every resource assesses the same reading, taken once per
//! change, and the gRPC handlers answer from the reading the kubelet was sent, never from a
//! read of `/dev` or sysfs of their own on gRPC's completion-queue thread.

mod common;

use std::fs;

use common::*;
use rdma_plugin::host::mock::{self, MockHca};

const IB: &str = "jarvice.com/ib";
const RDMA: &str = "jarvice.com/rdma";

fn id_of(hca: &MockHca) -> String {
    format!("hca-{}", hca.guid.replace(':', ""))
}

fn reads(plugin: &Plugin) -> usize {
    plugin.log_text().matches("read the host (reading").count()
}

#[test]
fn two_resources_share_one_reading_per_change() {
    let host = Host::with_hcas("shared");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    // No timer reads the host in this test: only the change below.
    let plugin = Plugin::start_with(
        &host,
        &[
            "--resource",
            RDMA,
            "--resource",
            "jarvice.com/ib,mode=per-hca,link=infiniband",
            "--health-interval",
            "3600",
            "--self-check",
            "0",
        ],
        |cmd| {
            cmd.env("RUST_LOG", "trace");
        },
    );
    kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    kubelet.wait_list(RDMA, "one device", |l| l.devices.len() == 1);
    let before = reads(&plugin);
    assert!(before >= 1, "{}", plugin.log_text());

    // mlx5_1's node goes: both resources hear of it, from one reading.
    host.remove_node("uverbs0");
    let gone = id_of(&MockHca::connectx(1));
    kubelet.wait_list(IB, "mlx5_1 Unhealthy", |l| {
        l.devices
            .iter()
            .any(|d| d.ID == gone && d.health == "Unhealthy")
    });
    assert!(wait_for(WAIT, || plugin
        .log_text()
        .contains("device nodes changed: 3 node(s)")));
    assert_eq!(reads(&plugin) - before, 1, "{}", plugin.log_text());
}

#[test]
fn preferred_allocation_answers_from_the_reading_the_kubelet_was_sent() {
    let host = Host::with_hcas("consistent");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    // Port states are read when the host is (no timer within the test), and count at once.
    let _plugin = Plugin::start(
        &host,
        &[
            "--resource",
            "jarvice.com/ib,mode=per-hca,link=infiniband",
            "--health-interval",
            "3600",
            "--hold-down",
            "0",
        ],
    );
    let list = kubelet.wait_list(IB, "two Healthy devices", |l| {
        l.devices.len() == 2 && l.devices.iter().all(|d| d.health == "Healthy")
    });
    let client = plugin_client(&host.plugin_dir().join("ib.sock"));
    let all: Vec<String> = list.devices.iter().map(|d| d.ID.clone()).collect();
    let pick_one = || preferred(&client, &all, &[], 1);
    let first = pick_one();
    let hcas = [MockHca::connectx(0), MockHca::connectx(1)];
    let (down, other) = if first == [id_of(&hcas[0])] {
        (&hcas[0], &hcas[1])
    } else {
        (&hcas[1], &hcas[0])
    };

    // The port goes down in sysfs, which gives no event: until the daemon reads the host, the
    // kubelet holds the device as Healthy, and the preference says the same.
    host.set_port(&down.name, 1, mock::DOWN_POLLING);
    assert_eq!(pick_one(), first);
    let alloc = client
        .allocate_opt(&alloc_request(&[&[&id_of(down)]]), opt())
        .unwrap();
    assert_eq!(
        alloc.container_responses[0].envs["JARVICE_RDMA_HCAS"],
        down.name
    );

    // Anything under /dev/infiniband makes the daemon read the host: the device turns
    // Unhealthy for the kubelet, and from that reading on the preference leaves it out.
    fs::write(host.root().join("dev/infiniband/not-a-node"), b"").unwrap();
    kubelet.wait_list(IB, "the downed HCA Unhealthy", |l| {
        l.devices
            .iter()
            .any(|d| d.ID == id_of(down) && d.health == "Unhealthy")
    });
    assert_eq!(pick_one(), [id_of(other)]);
}
