//! Several resources from one process (`--resource`): shared and per-HCA devices, each on its
//! own socket with its own registration, streams and health; stable per-HCA IDs; topology-aware
//! preferred allocation; what a container learns. The real binary, our fake kubelet, mock sysfs.

mod common;

use std::fs;
use std::thread;
use std::time::Duration;

use common::*;
use rdma_plugin::host::mock::{self, MockHca};
use rdma_plugin::kubelet::api;

const IB: &str = "jarvice.com/ib";
const RDMA: &str = "jarvice.com/rdma";
const TWO: [&str; 4] = [
    "--resource",
    "jarvice.com/rdma",
    "--resource",
    "jarvice.com/ib,mode=per-hca,link=infiniband",
];

/// The per-HCA ID of a mock HCA (from its node GUID).
fn id_of(hca: &MockHca) -> String {
    format!("hca-{}", hca.guid.replace(':', ""))
}

fn ids(list: &api::ListAndWatchResponse) -> Vec<String> {
    list.devices.iter().map(|d| d.ID.clone()).collect()
}

fn health_of(list: &api::ListAndWatchResponse, id: &str) -> String {
    list.devices
        .iter()
        .find(|d| d.ID == id)
        .map(|d| d.health.clone())
        .unwrap_or_default()
}

#[test]
fn two_resources_register_on_their_own_sockets_once_per_kubelet_restart() {
    let host = Host::with_hcas("two");
    let mut kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &TWO);
    let rdma = kubelet.wait_list(RDMA, "a device", |l| !l.devices.is_empty());
    assert_eq!(ids(&rdma), ["rdma-0"]);
    let ib = kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    assert_eq!(
        ids(&ib),
        [id_of(&MockHca::connectx(0)), id_of(&MockHca::connectx(1))]
    );
    // Per-HCA devices carry their HCA's NUMA node: mlx5_0 on 0, mlx5_1 on 1.
    let numa: Vec<Vec<i64>> = ib
        .devices
        .iter()
        .map(|d| d.topology.nodes.iter().map(|n| n.ID).collect())
        .collect();
    assert_eq!(numa, [vec![0], vec![1]]);
    assert!(host.plugin_dir().join("rdma.sock").exists());
    assert!(host.plugin_dir().join("ib.sock").exists());
    assert_eq!(
        (kubelet.registers_of(RDMA), kubelet.registers_of(IB)),
        (1, 1)
    );

    for _ in 0..5 {
        kubelet.stop_in_place();
        kubelet = FakeKubelet::start(&host.plugin_dir());
        kubelet.wait_list(RDMA, "a device", |l| !l.devices.is_empty());
        kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
        thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            (kubelet.registers_of(RDMA), kubelet.registers_of(IB)),
            (1, 1),
            "each resource registers exactly once per kubelet restart"
        );
    }
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn per_hca_allocate_grants_that_hcas_nodes_and_names_it() {
    let host = Host::with_hcas("perhca");
    fs::write(host.root().join("dev/knem"), b"").unwrap();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut args = TWO.to_vec();
    args.push("--hca-envs");
    let _plugin = Plugin::start(&host, &args);
    kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    let client = plugin_client(&host.plugin_dir().join("ib.sock"));
    let one = id_of(&MockHca::connectx(1));
    let resp = client
        .allocate_opt(&alloc_request(&[&[&one]]), opt())
        .unwrap();
    let c = &resp.container_responses[0];
    assert_eq!(
        spec_paths(c),
        [
            "/dev/infiniband/uverbs0",
            "/dev/infiniband/rdma_cm",
            "/dev/knem"
        ]
    );
    assert_eq!(c.envs["JARVICE_RDMA_HCAS"], "mlx5_1");
    assert_eq!(c.envs["NCCL_IB_HCA"], "=mlx5_1");
    assert_eq!(c.envs["UCX_NET_DEVICES"], "mlx5_1:1");

    let zero = id_of(&MockHca::connectx(0));
    let resp = client
        .allocate_opt(&alloc_request(&[&[&one, &zero]]), opt())
        .unwrap();
    let c = &resp.container_responses[0];
    assert_eq!(
        spec_paths(c),
        [
            "/dev/infiniband/uverbs0",
            "/dev/infiniband/uverbs1",
            "/dev/infiniband/rdma_cm",
            "/dev/knem"
        ]
    );
    assert_eq!(c.envs["JARVICE_RDMA_HCAS"], "mlx5_0,mlx5_1");

    // The RoCE NIC is not this resource's; an ID of another resource is unknown here.
    let status = rpc_status(
        client.allocate_opt(&alloc_request(&[&["rdma-0"]]), opt()),
        grpcio::RpcStatusCode::INVALID_ARGUMENT,
    );
    assert!(
        status.message().contains("per-HCA device(s)"),
        "{}",
        status.message()
    );
    // The shared resource still grants every node.
    let resp = plugin_client(&host.plugin_dir().join("rdma.sock"))
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(resp.container_responses[0].devices.len(), 5);
    assert!(resp.container_responses[0].envs.is_empty());
}

#[test]
fn ids_survive_a_plugin_restart_and_a_reorder_of_names() {
    let host = Host::empty("reorder");
    host.add_hca(&MockHca::connectx(0));
    host.add_hca(&MockHca::connectx(1).numa(1));
    let spec = ["--resource", "jarvice.com/ib,mode=per-hca"];
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &spec);
    let first = ids(&kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2));
    drop(plugin);
    drop(kubelet);

    // A driver reload names them the other way round (same GUIDs, same PCI functions), and
    // their uverbs numbers change too.
    let reordered = Host::empty("reorder2");
    let mut a = MockHca::connectx(0).uverbs(1);
    a.name = "mlx5_1".into();
    let mut b = MockHca::connectx(1).numa(1).uverbs(0);
    b.name = "mlx5_0".into();
    reordered.add_hca(&a);
    reordered.add_hca(&b);
    let kubelet = FakeKubelet::start(&reordered.plugin_dir());
    let _plugin = Plugin::start(&reordered, &spec);
    let list = kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    let mut again = ids(&list);
    let mut want = first.clone();
    again.sort();
    want.sort();
    assert_eq!(again, want, "the same IDs whatever the names");
    // And each ID still grants the HCA with that GUID: connectx(0)'s, now named mlx5_1.
    let resp = plugin_client(&reordered.plugin_dir().join("ib.sock"))
        .allocate_opt(&alloc_request(&[&[&id_of(&MockHca::connectx(0))]]), opt())
        .unwrap();
    let c = &resp.container_responses[0];
    assert_eq!(c.envs["JARVICE_RDMA_HCAS"], "mlx5_1");
    assert_eq!(spec_paths(c)[0], "/dev/infiniband/uverbs1");
}

#[test]
fn preferred_allocation_keeps_numa_and_pcie_together_and_honours_must_include() {
    // mlx5_0 and mlx5_1 under one switch on NUMA 0, mlx5_2 on NUMA 0 under another root
    // port, mlx5_3 on NUMA 1.
    let host = Host::empty("topo");
    let mut hcas = Vec::new();
    for (n, numa, rc, bridges) in [
        (0, 0, "pci0000:00", vec!["0000:00:01.0", "0000:01:00.0"]),
        (1, 0, "pci0000:00", vec!["0000:00:01.0", "0000:01:01.0"]),
        (2, 0, "pci0000:00", vec!["0000:00:02.0"]),
        (3, 1, "pci0000:80", vec!["0000:80:01.0"]),
    ] {
        let mut h = MockHca::connectx(n).numa(numa);
        h.root_complex = rc.into();
        h.bridges = bridges.into_iter().map(String::from).collect();
        host.add_hca(&h);
        hcas.push(h);
    }
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &["--resource", "jarvice.com/ib,mode=per-hca"]);
    let list = kubelet.wait_list(IB, "four devices", |l| l.devices.len() == 4);
    let all = ids(&list);
    let id = |n: usize| id_of(&hcas[n]);
    let client = plugin_client(&host.plugin_dir().join("ib.sock"));
    let available: Vec<String> = all.iter().rev().cloned().collect();
    let pick = |must: &[String], size: i32| preferred(&client, &available, must, size);
    assert_eq!(pick(&[], 2), [id(0), id(1)], "same NUMA node, same switch");
    assert_eq!(
        pick(&[], 3),
        [id(0), id(1), id(2)],
        "then the same NUMA node"
    );
    assert_eq!(
        pick(&[id(2)], 2),
        [id(2), id(0)],
        "must_include first, then its NUMA node"
    );
    assert_eq!(pick(&[id(3)], 1), [id(3)]);
    assert_eq!(pick(&[], 2), pick(&[], 2), "deterministic");
}

#[test]
fn a_port_down_turns_only_that_hcas_device_unhealthy() {
    let host = Host::with_hcas("oneport");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut args = TWO.to_vec();
    args.extend(["--hold-down", "0", "--health-interval", "0.1"]);
    let _plugin = Plugin::start(&host, &args);
    kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    host.set_port("mlx5_1", 1, mock::DOWN_POLLING);
    let (zero, one) = (id_of(&MockHca::connectx(0)), id_of(&MockHca::connectx(1)));
    let list = kubelet.wait_list(IB, "mlx5_1 Unhealthy", |l| {
        health_of(l, &one) == "Unhealthy"
    });
    assert_eq!(health_of(&list, &zero), "Healthy");
    // The shared resource is degraded, not down.
    let rdma = kubelet.wait_list(RDMA, "a device", |l| !l.devices.is_empty());
    assert_eq!(rdma.devices[0].health, "Healthy");
    host.set_port("mlx5_1", 1, mock::ACTIVE);
    kubelet.wait_list(IB, "mlx5_1 Healthy", |l| health_of(l, &one) == "Healthy");
}

#[test]
fn every_resource_keeps_serving_when_anothers_socket_is_deleted() {
    let host = Host::with_hcas("othersock");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &TWO);
    kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    kubelet.wait_list(RDMA, "a device", |l| !l.devices.is_empty());
    fs::remove_file(host.plugin_dir().join("ib.sock")).unwrap();
    assert!(plugin.wait_log("our socket was removed"));
    assert!(wait_for(WAIT, || kubelet.registers_of(IB) == 2));
    let resp = plugin_client(&host.plugin_dir().join("rdma.sock"))
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(resp.container_responses[0].devices.len(), 4);
    let resp = plugin_client(&host.plugin_dir().join("ib.sock"))
        .allocate_opt(&alloc_request(&[&[&id_of(&MockHca::connectx(0))]]), opt())
        .unwrap();
    assert_eq!(resp.container_responses[0].devices.len(), 2);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        kubelet.registers_of(RDMA),
        1,
        "the other resource was left alone"
    );
}

#[test]
fn bad_specs_and_overlapping_per_hca_resources_exit_2() {
    let host = Host::with_hcas("badspec");
    for (args, want) in [
        (
            &["--resource", "jarvice.com/ib,mode=sometimes"][..],
            "mode \"sometimes\"",
        ),
        (
            &["--resource", "jarvice.com/ib,colour=blue"],
            "unknown key \"colour\"",
        ),
        (
            &["--resource", "jarvice.com/ib,mode=per-hca,shares=2"],
            "shares= goes with mode=shared",
        ),
        (&["--resource", "jarvice.com/ib,hcas"], "is not key=value"),
        (&["--resource", "ib"], "not an extended resource name"),
        (
            &["--resource", "a.com/x", "--resource", "a.com/x"],
            "declared twice",
        ),
        (
            &["--resource", "a.com/x", "--resource", "b.com/x"],
            "device IDs (x-0, ...) would collide",
        ),
        (
            &[
                "--resource",
                "a.com/x",
                "--resource",
                "a.com/y,socket=x.sock",
            ],
            "give one with socket=NAME",
        ),
        (
            &["--resource", "a.com/x", "--shares", "2"],
            "--shares goes with the single resource",
        ),
        (
            &["--resource", "a.com/x,socket=kubelet.sock"],
            "plain file name",
        ),
    ] {
        let out = run(&host, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: missing {want:?} in {err}");
    }
    let mut plugin = Plugin::start(
        &host,
        &[
            "--resource",
            "jarvice.com/ib,mode=per-hca,link=infiniband",
            "--resource",
            "jarvice.com/a,mode=per-hca,hcas=mlx5_0;mlx5_2",
        ],
    );
    let status = plugin.wait_exit(WAIT).expect("refused at start");
    assert_eq!(status.code(), Some(2));
    assert!(plugin
        .log_text()
        .contains("per-HCA resources jarvice.com/ib and jarvice.com/a both select mlx5_0"));
    // Shared over per-HCA: allowed, with a warning.
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &TWO);
    kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    assert!(plugin.wait_log("jarvice.com/rdma and jarvice.com/ib both grant mlx5_0"));
}

#[test]
fn cdi_specs_are_written_kept_current_and_removed_and_allocate_names_them() {
    let host = Host::with_hcas("cdi");
    let cdi_dir = host.tmp.path().join("cdi");
    let cdi_arg = cdi_dir.display().to_string();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut args = TWO.to_vec();
    args.extend(["--cdi", "--cdi-dir", &cdi_arg]);
    let mut plugin = Plugin::start(&host, &args);
    kubelet.wait_list(IB, "two devices", |l| l.devices.len() == 2);
    let ib_spec = cdi_dir.join("jarvice.com_ib.json");
    let rdma_spec = cdi_dir.join("jarvice.com_rdma.json");
    assert!(wait_for(WAIT, || ib_spec.exists() && rdma_spec.exists()));
    let (zero, one) = (id_of(&MockHca::connectx(0)), id_of(&MockHca::connectx(1)));
    let text = fs::read_to_string(&ib_spec).unwrap();
    assert_eq!(
        text,
        format!(
            "{{\"cdiVersion\":\"0.6.0\",\"kind\":\"jarvice.com/ib\",\"devices\":[\
             {{\"name\":\"{zero}\",\"containerEdits\":{{\"deviceNodes\":[\
             {{\"path\":\"/dev/infiniband/uverbs1\",\"permissions\":\"rw\"}},\
             {{\"path\":\"/dev/infiniband/rdma_cm\",\"permissions\":\"rw\"}}]}}}},\
             {{\"name\":\"{one}\",\"containerEdits\":{{\"deviceNodes\":[\
             {{\"path\":\"/dev/infiniband/uverbs0\",\"permissions\":\"rw\"}},\
             {{\"path\":\"/dev/infiniband/rdma_cm\",\"permissions\":\"rw\"}}]}}}}]}}\n"
        )
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&ib_spec).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // Valid JSON, as a runtime would parse it (when python3 is here to say so).
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-m", "json.tool"])
        .arg(&rdma_spec)
        .output()
    {
        assert!(out.status.success(), "{out:?}");
    }

    // Allocate names CDI devices, and grants the nodes as device specs too (for a runtime
    // without CDI; tests/cdi.rs has --cdi-only).
    let client = plugin_client(&host.plugin_dir().join("ib.sock"));
    let resp = client
        .allocate_opt(&alloc_request(&[&[&one]]), opt())
        .unwrap();
    let c = &resp.container_responses[0];
    let names: Vec<&str> = c.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, [format!("jarvice.com/ib={one}")]);
    assert_eq!(
        spec_paths(c),
        ["/dev/infiniband/uverbs0", "/dev/infiniband/rdma_cm"]
    );
    assert_eq!(c.envs["JARVICE_RDMA_HCAS"], "mlx5_1");

    // A node goes: the spec follows (no stale spec after a rescan).
    host.remove_node("uverbs0");
    assert!(wait_for(WAIT, || !fs::read_to_string(&ib_spec)
        .unwrap_or_default()
        .contains("uverbs0")));
    assert!(!fs::read_to_string(&rdma_spec).unwrap().contains("uverbs0"));

    // The specs stay at exit: the kubelet restarts a running pod's container with the CDI
    // names of its first Allocate, whether the plugin runs or not.
    let kept = fs::read_to_string(&ib_spec).unwrap();
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait_exit(WAIT).expect("exits").success());
    assert_eq!(
        fs::read_to_string(&ib_spec).unwrap(),
        kept,
        "specs kept at exit"
    );
    assert!(rdma_spec.exists());
    drop(kubelet);

    // --cdi-device-specs (the default now) is still accepted: deploy files of 2.0 pass it.
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    args.push("--cdi-device-specs");
    let _plugin = Plugin::start(&host, &args);
    kubelet.wait_list(RDMA, "a device", |l| !l.devices.is_empty());
    let resp = plugin_client(&host.plugin_dir().join("rdma.sock"))
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    let c = &resp.container_responses[0];
    assert_eq!(c.cdi_devices[0].name, "jarvice.com/rdma=rdma-0");
    assert_eq!(c.devices.len(), 3);
}

#[test]
fn cdi_specs_give_character_devices_their_numbers() {
    let host = Host::empty("cdichar");
    host.add_hca(&MockHca::connectx(0));
    let node = host.root().join("dev/infiniband/uverbs0");
    fs::remove_file(&node).unwrap();
    if !mknod(&node, 231, 192) {
        eprintln!("mknod not permitted (not root): skipped");
        return;
    }
    let cdi_dir = host.tmp.path().join("cdi");
    let out = cdi_dir.display().to_string();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &["--cdi", "--cdi-dir", &out]);
    kubelet.expect_registered();
    let spec = cdi_dir.join("jarvice.com_rdma.json");
    assert!(wait_for(WAIT, || spec.exists()));
    assert!(fs::read_to_string(&spec).unwrap().contains(
        "{\"path\":\"/dev/infiniband/uverbs0\",\"type\":\"c\",\"major\":231,\"minor\":192,\"permissions\":\"rw\"}"
    ));
}

#[test]
fn list_probe_and_diagnose_cover_every_resource() {
    let host = Host::with_hcas("tools2");
    let out = run(&host, &["list", TWO[0], TWO[1], TWO[2], TWO[3]]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let zero = id_of(&MockHca::connectx(0));
    for want in [
        "resource  jarvice.com/rdma",
        "resource  jarvice.com/ib\ndevices   one per HCA",
        &format!("HCA mlx5_0 ({zero})  granted"),
        &format!("{zero:<11} Healthy     0"),
        "rdma-0      Healthy     0,1",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let out = run(&host, &["list", "--json", TWO[0], TWO[1], TWO[2], TWO[3]]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.starts_with("{\"resources\":[{\"resource_name\":\"jarvice.com/rdma\""),
        "{json}"
    );
    assert!(
        json.contains("{\"resource_name\":\"jarvice.com/ib\""),
        "{json}"
    );

    let _kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &TWO);
    assert!(wait_for(WAIT, || host
        .plugin_dir()
        .join("ib.sock")
        .exists()));
    let out = run(&host, &["probe", TWO[0], TWO[1], TWO[2], TWO[3]]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("rdma.sock answers as the kubelet expects"),
        "{text}"
    );
    assert!(
        text.contains("ib.sock answers as the kubelet expects"),
        "{text}"
    );
    let out = run(&host, &["diagnose", TWO[0], TWO[1], TWO[2], TWO[3]]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "ok   health: jarvice.com/rdma is Healthy",
        "ok   health: jarvice.com/ib is Healthy: 2 of 2 HCAs up",
        "ok   selection: jarvice.com/ib: --link-layer infiniband: 2 of 3 HCA(s) granted",
        "ib.sock answers: 2 device(s), 2 Healthy",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn cdi_kinds_are_checked() {
    let host = Host::new("cdibad");
    let out = run(&host, &["--cdi", "--resource", "jarvice.com/ib.hdr"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a CDI kind"));
}
