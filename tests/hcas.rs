//! The HCA model end to end: mock sysfs trees laid out as the kernel does (symlinks included),
//! the real binary, and our fake kubelet. Port-state health with hold-down, HCA selection in
//! Allocate, and the `list` and `diagnose` reports.

mod common;

use std::fs;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use rdma_plugin::host::mock::{self, MockHca, MockPort};
use rdma_plugin::kubelet::api;

/// A kubelet, then the plugin with `extra` flags; returns them with the first list.
fn start(host: &Host, extra: &[&str]) -> (FakeKubelet, Plugin, api::ListAndWatchResponse) {
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(host, extra);
    kubelet.expect_registered();
    let list = kubelet.expect_list();
    (kubelet, plugin, list)
}

fn health_of(list: &api::ListAndWatchResponse) -> &str {
    &list.devices[0].health
}

#[test]
fn a_port_down_turns_unhealthy_after_the_hold_down_and_healthy_at_once_when_back() {
    let host = Host::empty("portdown");
    host.add_hca(&MockHca::connectx(0));
    host.add_hca(&MockHca::connectx(1));
    let hold = Duration::from_millis(1500);
    let (kubelet, plugin) =
        start_registered(&host, &["--health-interval", "0.1", "--hold-down", "1.5"]);
    assert!(plugin.wait_log("health from ports"));

    // One of two HCAs down: still Healthy, and the log says it is degraded.
    host.set_port("mlx5_1", 1, mock::DOWN_POLLING);
    assert!(plugin
        .wait_log("mlx5_1 port 1: DOWN (Polling): jarvice.com/rdma is Healthy (1 of 2 HCAs up"));

    // The last HCA down: Unhealthy, but not before the hold-down.
    let down_at = Instant::now();
    host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
    kubelet.expect_health("Unhealthy");
    assert!(
        down_at.elapsed() >= hold,
        "Unhealthy after {:?}, before the hold-down",
        down_at.elapsed()
    );
    assert!(plugin
        .wait_log("mlx5_0 port 1: DOWN (Polling): jarvice.com/rdma is Unhealthy (0 of 2 HCAs up"));

    // Back up: Healthy at once (well within the hold-down), logged once.
    host.set_port("mlx5_0", 1, mock::ACTIVE);
    kubelet.expect_health("Healthy");
    assert!(plugin
        .wait_log("mlx5_0 port 1: ACTIVE (LinkUp): jarvice.com/rdma is Healthy (1 of 2 HCAs up"));
    let log = plugin.log_text();
    assert_eq!(log.matches("mlx5_0 port 1: DOWN").count(), 1, "{log}");
}

#[test]
fn a_flap_shorter_than_the_hold_down_changes_nothing() {
    let host = Host::empty("flap");
    host.add_hca(&MockHca::connectx(0));
    let (kubelet, plugin) =
        start_registered(&host, &["--health-interval", "0.05", "--hold-down", "3"]);
    host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
    // Read down at least twice, then back.
    std::thread::sleep(Duration::from_millis(500));
    host.set_port("mlx5_0", 1, mock::ACTIVE);
    // Past the hold-down from the flap's start: no list was sent, nothing logged.
    let quiet = kubelet.next_within(Duration::from_millis(3500));
    assert!(quiet.is_none(), "unexpected: {quiet:?}");
    assert!(!plugin.log_text().contains("mlx5_0 port 1: DOWN"));
}

#[test]
fn an_uncabled_second_port_does_not_count_and_ports_mode_without_sysfs_is_unhealthy() {
    let host = Host::empty("uncabled");
    host.add_hca(&MockHca::connectx(0).ports(vec![
        MockPort::ib(mock::ACTIVE),
        MockPort::ib(mock::DOWN_DISABLED),
    ]));
    let (kubelet, plugin) = start_registered(&host, &["--health-interval", "0.1"]);
    assert!(plugin.wait_log("is Healthy (1 of 1 HCAs up, health from ports)"));
    drop((kubelet, plugin));

    // No sysfs, `--health ports` asked for: Unhealthy with the reason, still serving.
    let bare = Host::new("nosysfs");
    let (kubelet, plugin, list) = start(&bare, &["--health", "ports"]);
    assert_eq!(health_of(&list), "Unhealthy");
    assert!(plugin.wait_log("sysfs describes no HCA with ports"));
    // Default rule on the same host: today's behaviour, Healthy from the nodes.
    drop((kubelet, plugin));
    let (_kubelet, _plugin, list) = start(&bare, &[]);
    assert_eq!(health_of(&list), "Healthy");
}

#[test]
fn selection_keeps_the_roce_nic_out_of_allocate() {
    let host = Host::with_hcas("select");
    let (kubelet, plugin, list) = start(&host, &["--link-layer", "infiniband"]);
    assert_eq!(health_of(&list), "Healthy");
    // NUMA of the granted HCAs: mlx5_0 on 0, mlx5_1 on 1 (the RoCE NIC is left out).
    let numa: Vec<i64> = list.devices[0]
        .topology
        .nodes
        .iter()
        .map(|n| n.ID)
        .collect();
    assert_eq!(numa, [0, 1]);
    assert!(plugin.wait_log("HCA mlx5_2: port 1 ACTIVE (LinkUp) Ethernet"));
    assert!(plugin.wait_log("not granted: link layer Ethernet, not InfiniBand"));
    let client = plugin_client(&host.socket());
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(
        spec_paths(&resp.container_responses[0]),
        [
            "/dev/infiniband/uverbs0",
            "/dev/infiniband/uverbs1",
            "/dev/infiniband/rdma_cm"
        ]
    );
    // Exclusions by name compose with the link layer.
    drop((kubelet, plugin));
    let (_kubelet, _plugin) =
        start_registered(&host, &["--link-layer", "infiniband", "--hcas", "!mlx5_1"]);
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(
        spec_paths(&resp.container_responses[0]),
        ["/dev/infiniband/uverbs1", "/dev/infiniband/rdma_cm"]
    );
}

#[test]
fn a_selection_that_matches_nothing_is_unhealthy_and_loud_not_fatal() {
    let host = Host::with_hcas("nomatch");
    let (_kubelet, mut plugin, list) = start(&host, &["--hcas", "bnxt_re*"]);
    assert_eq!(health_of(&list), "Unhealthy");
    assert!(plugin.wait_log("--hcas bnxt_re* matches no HCA"));
    let client = plugin_client(&host.socket());
    let status = rpc_status(
        client.allocate_opt(&alloc_request(&[&["rdma-0"]]), opt()),
        grpcio::RpcStatusCode::UNAVAILABLE,
    );
    assert!(status.message().contains("uverbs"), "{}", status.message());
    assert!(plugin.wait_exit(Duration::from_millis(200)).is_none());
}

#[test]
fn list_shows_hcas_ports_selection_and_health() {
    let host = Host::with_hcas("listhca");
    host.set_port("mlx5_1", 1, mock::INIT);
    let out = run(&host, &["list", "--link-layer", "infiniband"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    for want in [
        "granting  --link-layer infiniband",
        "health    Healthy: 1 of 2 HCAs up; down: mlx5_1: port 1 INIT (LinkUp) InfiniBand (rule ports)",
        "HCA mlx5_0 (hca-0c42a10300c45e00)  granted",
        "  port 1  ACTIVE (LinkUp)  InfiniBand  200 Gb/sec (4X HDR)",
        "  numa    1",
        "  pci     0000:10:00.0 (15b3:101b)  path pci0000:0f/0000:0f:00.0/0000:10:00.0",
        "  netdevs ib0",
        "  nodes   uverbs1 issm0 umad0",
        "HCA mlx5_2 (hca-0c42a10300c45e02)  not granted: link layer Ethernet, not InfiniBand",
        "rdma-0      Healthy     0,1",
        "/dev/infiniband/uverbs1 -> /dev/infiniband/uverbs1 rw",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("uverbs2 ->"), "{text}");

    let out = run(&host, &["list", "--json", "--link-layer", "infiniband"]);
    assert!(out.status.success(), "{out:?}");
    let json = stdout(&out);
    for want in [
        "\"health\":{\"healthy\":true,\"rule\":\"ports\"",
        "\"hcas_up\":1,\"hcas_granted\":2",
        "{\"name\":\"mlx5_2\",\"id\":\"hca-0c42a10300c45e02\",\"granted\":false,\"why_not\":\"link layer Ethernet, not InfiniBand\"",
        "\"state\":\"INIT\",\"phys_state\":\"LinkUp\",\"link_layer\":\"InfiniBand\"",
        "\"pci_address\":\"0000:12:00.0\"",
        "{\"name\":\"uverbs0\",\"port\":null,\"dev\":\"231:192\"}",
    ] {
        assert!(json.contains(want), "missing {want:?} in:\n{json}");
    }
}

/// Runs `diagnose` with the child's locked-memory limit set to `memlock` (bytes; `None` for
/// unlimited). Returns `None` when the limit cannot be raised (not root).
fn diagnose(host: &Host, memlock: Option<u64>, extra: &[&str]) -> Option<Output> {
    // rlim_t is not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    let probe_limit = memlock.map_or(libc::RLIM_INFINITY, |n| n as libc::rlim_t);
    let lim = libc::rlimit {
        rlim_cur: probe_limit,
        rlim_max: probe_limit,
    };
    // SAFETY (test): setrlimit on this process's own limits with a valid struct; undone below.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old);
        let can = libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) == 0;
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &old);
        if !can {
            return None;
        }
    }
    let mut cmd = plugin_command();
    cmd.arg("diagnose").args(extra).args(host.args());
    let n = memlock.unwrap_or(u64::MAX);
    with_limit(Rlimit::Memlock, n, n)(&mut cmd);
    Some(cmd.output().expect("run diagnose"))
}

#[test]
fn diagnose_names_each_problem_with_its_fix_and_passes_when_all_is_well() {
    let host = Host::with_hcas("diag");
    mock::set_netns_mode(&host.sys(), true).unwrap();
    host.set_port("mlx5_1", 1, mock::DOWN_POLLING);
    host.remove_node("uverbs2");
    // A verbs entry naming an HCA sysfs does not list (a partial tree).
    mock::write(
        &host.sys().join("class/infiniband_verbs/uverbs9/ibdev"),
        "mlx5_9\n",
    )
    .unwrap();

    // No kubelet, no plugin, a low memlock, a missing node, a port down.
    let out = diagnose(&host, Some(64 << 10), &[]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    for want in [
        "fail memlock: containers get a locked-memory limit of 64 KiB",
        "     fix: raise the runtime's default: containerd:",
        "ok   rdma netns: shared",
        "ok   hcas: 3 HCA(s): mlx5_0, mlx5_1, mlx5_2",
        "fail device nodes: mlx5_2: sysfs lists uverbs2 but",
        "warn device nodes: sysfs names uverbs9 for HCA mlx5_9, which class/infiniband does not list",
        "warn ports: mlx5_1 port 1: DOWN (Polling) InfiniBand",
        "ok   ports: mlx5_0 port 1: ACTIVE (LinkUp) InfiniBand",
        "ok   health: jarvice.com/rdma is Healthy: 1 of 3 HCAs up",
        "fail kubelet:",
        "fail plugin:",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    let out = diagnose(&host, Some(64 << 10), &["--json"]).unwrap();
    let json = stdout(&out);
    assert!(json.starts_with("{\"passed\":false,\"checks\":["), "{json}");
    assert!(
        json.contains("{\"check\":\"rdma netns\",\"status\":\"ok\""),
        "{json}"
    );

    // Everything well: a kubelet, the plugin serving, nodes back, no stray verbs entry.
    host.add_node("uverbs2");
    host.set_port("mlx5_1", 1, mock::ACTIVE);
    fs::remove_dir_all(host.sys().join("class/infiniband_verbs/uverbs9")).unwrap();
    let (_kubelet, _plugin) = start_registered(&host, &[]);
    match diagnose(&host, None, &[]) {
        // Unlimited memlock (raising it needs CAP_SYS_RESOURCE): nothing fails, exit 0.
        Some(out) => {
            let text = stdout(&out);
            assert_eq!(out.status.code(), Some(0), "{text}");
            assert!(text.contains("ok   memlock: unlimited"), "{text}");
            assert!(text.contains("ok   plugin:"), "{text}");
            assert!(text.contains("0 failed, 0 warning(s)"), "{text}");
        }
        // Without the capability the memlock check is what it is here; every other check
        // must pass.
        None => {
            let out = run(&host, &["diagnose"]);
            let text = stdout(&out);
            let mut checks = 0;
            for line in text.lines() {
                if line.contains(" check(s): ") {
                    break;
                }
                if line.starts_with("     fix:") {
                    continue;
                }
                checks += 1;
                if line.contains(" memlock: ") {
                    continue;
                }
                assert!(line.starts_with("ok   "), "not ok: {line}\n{text}");
            }
            assert!(checks > 10, "{text}");
            assert!(text.contains("ok   plugin:"), "{text}");
        }
    }
}

#[test]
fn the_daemon_warns_about_memlock_once_at_start() {
    let host = Host::with_hcas("memlock");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start_with(&host, &[], with_limit(Rlimit::Memlock, 64 << 10, 64 << 10));
    kubelet.expect_registered();
    assert!(plugin.wait_log("memlock: containers get a locked-memory limit of 64 KiB"));
    assert_eq!(plugin.log_text().matches("memlock:").count(), 1);
}
