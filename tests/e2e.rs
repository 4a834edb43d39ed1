//! The real binary against the fake kubelet, over real unix sockets. Each test owns its temp
//! tree, so they run in parallel; every wait is bounded by `common::WAIT`.

mod common;

use std::fs;
use std::os::unix::net::UnixListener;

use common::*;
use grpcio::RpcStatusCode;
use rdma_plugin::kubelet::api;

fn two_hca_specs() -> Vec<String> {
    vec![
        "/dev/infiniband/uverbs0".to_string(),
        "/dev/infiniband/uverbs1".to_string(),
        "/dev/infiniband/rdma_cm".to_string(),
    ]
}

#[test]
fn registers_with_the_contract_fields_and_answers_the_dial_back() {
    let host = Host::new("reg");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &[]);

    let (req, dialed) = kubelet.expect_registered();
    assert_eq!(req.version, "v1beta1");
    assert_eq!(req.endpoint, "rdma.sock", "endpoint is the socket basename");
    assert_eq!(req.resource_name, "jarvice.com/rdma");
    assert!(req.options.get_preferred_allocation_available);
    assert!(!req.options.pre_start_required);
    // The kubelet's GetDevicePluginOptions during Register got the same answer.
    assert_eq!(&dialed, req.options.as_ref().unwrap());

    let list = kubelet.expect_list();
    assert_eq!(
        healths(&list),
        [("rdma-0".to_string(), "Healthy".to_string())]
    );
}

#[test]
fn old_kubelets_authority_form_is_accepted() {
    let host = Host::new("authority");
    let behaviour = Behaviour {
        authority: Authority::SocketPath,
        ..Behaviour::default()
    };
    let kubelet = FakeKubelet::start_with(&host.plugin_dir(), behaviour);
    let _plugin = Plugin::start(&host, &[]);
    kubelet.expect_registered();
    assert_eq!(kubelet.expect_list().devices.len(), 1);

    let client = plugin_client_as(&host.socket(), Authority::SocketPath);
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(spec_paths(&resp.container_responses[0]), two_hca_specs());
}

#[test]
fn allocate_for_one_and_two_containers_grants_the_latest_reading() {
    let host = Host::new("alloc");
    fs::write(host.root().join("dev/knem"), b"").unwrap();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &["--shares", "2"]);
    kubelet.expect_registered();
    kubelet.expect_list();
    let client = plugin_client(&host.socket());

    let one = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(one.container_responses.len(), 1);
    let c = &one.container_responses[0];
    let mut want = two_hca_specs();
    want.push("/dev/knem".into());
    assert_eq!(spec_paths(c), want);
    for d in &c.devices {
        assert_eq!(d.container_path, d.host_path);
        assert_eq!(d.permissions, "rw");
    }
    assert!(c.envs.is_empty() && c.mounts.is_empty() && c.annotations.is_empty());

    // A node added since start: read within milliseconds (inotify), sent to the kubelet (each
    // list is the whole list), and granted from then on. Allocate answers from that reading,
    // never from a read of its own on gRPC's thread.
    host.add_node("uverbs10");
    kubelet.expect_list();
    let two = client
        .allocate_opt(&alloc_request(&[&["rdma-0"], &["rdma-1"]]), opt())
        .unwrap();
    assert_eq!(two.container_responses.len(), 2);
    for c in &two.container_responses {
        assert_eq!(
            spec_paths(c),
            [
                "/dev/infiniband/uverbs0",
                "/dev/infiniband/uverbs1",
                "/dev/infiniband/uverbs10",
                "/dev/infiniband/rdma_cm",
                "/dev/knem"
            ]
        );
    }
}

#[test]
fn bad_requests_get_invalid_argument_and_the_plugin_keeps_serving() {
    let host = Host::new("badreq");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &[]);
    kubelet.expect_registered();
    let client = plugin_client(&host.socket());

    let cases: [(api::AllocateRequest, &str); 3] = [
        (alloc_request(&[&["rdma-0", "mlx5_0"]]), "\"mlx5_0\""),
        (alloc_request(&[]), "no containers"),
        (alloc_request(&[&[]]), "no device IDs"),
    ];
    for (req, needle) in cases {
        let status = rpc_status(
            client.allocate_opt(&req, opt()),
            RpcStatusCode::INVALID_ARGUMENT,
        );
        assert!(status.message().contains(needle), "{}", status.message());
    }
    // Still serving, and still correct.
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(spec_paths(&resp.container_responses[0]), two_hca_specs());
    let pre = client
        .pre_start_container_opt(&api::PreStartContainerRequest::new(), opt())
        .unwrap();
    assert_eq!(pre, api::PreStartContainerResponse::new());
}

#[test]
fn preferred_allocation_honours_must_include_and_size() {
    let host = Host::new("pref");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &["--shares", "12"]);
    kubelet.expect_registered();
    let ids: Vec<String> = kubelet
        .expect_list()
        .devices
        .iter()
        .map(|d| d.ID.clone())
        .collect();
    assert_eq!(ids.len(), 12);
    assert_eq!(ids[10], "rdma-10", "IDs are stable and in natural order");

    let client = plugin_client(&host.socket());
    let mut c = api::ContainerPreferredAllocationRequest::new();
    c.available_deviceIDs = vec![
        "rdma-11".into(),
        "rdma-3".into(),
        "rdma-10".into(),
        "rdma-2".into(),
    ];
    c.must_include_deviceIDs = vec!["rdma-11".into()];
    c.allocation_size = 3;
    let mut req = api::PreferredAllocationRequest::new();
    req.container_requests.push(c);
    let first = client.get_preferred_allocation_opt(&req, opt()).unwrap();
    assert_eq!(
        first.container_responses[0].deviceIDs,
        ["rdma-11", "rdma-2", "rdma-3"]
    );
    let again = client.get_preferred_allocation_opt(&req, opt()).unwrap();
    assert_eq!(first, again, "deterministic");

    // Only a hint: an ID we do not know is not an error here (an error would fail admission);
    // Allocate is where unknown IDs are refused.
    req.container_requests[0].must_include_deviceIDs = vec!["rdma-99".into()];
    let hint = client.get_preferred_allocation_opt(&req, opt()).unwrap();
    assert_eq!(
        hint.container_responses[0].deviceIDs,
        ["rdma-99", "rdma-2", "rdma-3"]
    );
    assert!(client
        .allocate_opt(&alloc_request(&[&["rdma-99"]]), opt())
        .is_err());
}

#[test]
fn sigterm_removes_the_socket_and_exits_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
        let host = Host::new("term");
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        let mut plugin = Plugin::start(&host, &[]);
        kubelet.expect_registered();
        kubelet.expect_list();
        assert!(host.socket().exists());
        plugin.signal(sig);
        let status = plugin.wait_exit(WAIT).expect("plugin exits");
        assert_eq!(status.code(), Some(0), "signal {sig}");
        assert!(!host.socket().exists(), "socket removed after signal {sig}");
        kubelet.expect("the stream to end", |ev| {
            matches!(ev, Event::StreamEnded).then_some(())
        });
    }
}

#[test]
fn sighup_serves_and_registers_again() {
    let host = Host::new("hup");
    let (kubelet, plugin) = start_registered(&host, &[]);
    plugin.signal(libc::SIGHUP);
    kubelet.expect("the old stream to end", |ev| {
        matches!(ev, Event::StreamEnded).then_some(())
    });
    let (req, _) = kubelet.expect_registered();
    assert_eq!(req.endpoint, "rdma.sock");
    assert_eq!(kubelet.expect_list().devices.len(), 1);
    assert!(plugin.log_text().contains("SIGHUP"));
}

#[test]
fn stale_socket_from_a_crashed_instance_is_reclaimed() {
    let host = Host::new("stale");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    // A socket file nobody listens on any more, as SIGKILL leaves it.
    drop(UnixListener::bind(host.socket()).unwrap());
    assert!(host.socket().exists());
    let plugin = Plugin::start(&host, &[]);
    kubelet.expect_registered();
    assert!(plugin.log_text().contains("removing stale socket"));
    let resp = plugin_client(&host.socket())
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(resp.container_responses.len(), 1);
}

#[test]
fn a_live_socket_means_another_instance_and_refuses_to_start() {
    let host = Host::new("inuse");
    let _other = UnixListener::bind(host.socket()).unwrap();
    let mut plugin = Plugin::start(&host, &[]);
    let status = plugin.wait_exit(WAIT).expect("second instance exits");
    assert_eq!(status.code(), Some(1));
    assert!(
        plugin.log_text().contains("another plugin instance"),
        "{}",
        plugin.log_text()
    );
    assert!(
        host.socket().exists(),
        "the other instance's socket is left alone"
    );
}

#[test]
fn a_kubelet_that_appears_later_gets_registered() {
    let host = Host::new("late");
    let plugin = Plugin::start(&host, &[]);
    assert!(plugin.wait_log("is the kubelet running?"));
    assert!(
        !host.socket().exists(),
        "serves nobody without a kubelet (tests/rest.rs)"
    );
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let (req, _) = kubelet.expect_registered();
    assert_eq!(req.resource_name, "jarvice.com/rdma");
    assert_eq!(kubelet.expect_list().devices.len(), 1);
}

#[test]
fn a_kubelet_restart_is_followed_by_a_new_registration() {
    let host = Host::new("restart");
    let (kubelet, _plugin) = start_registered(&host, &[]);
    kubelet.stop();

    // The new kubelet removes our socket and creates kubelet.sock.
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    kubelet.expect_registered();
    assert_eq!(
        healths(&kubelet.expect_list()),
        [("rdma-0".to_string(), "Healthy".to_string())],
        "same stable ID after the restart"
    );
    assert!(host.socket().exists());
}

#[test]
fn no_driver_registers_unhealthy_then_turns_healthy() {
    let host = Host::empty("nodrv");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &[]);
    kubelet.expect_registered();
    assert_eq!(
        healths(&kubelet.expect_list()),
        [("rdma-0".to_string(), "Unhealthy".to_string())]
    );
    // Allocating anyway (a kubelet that has not seen the list yet) is refused, not granted
    // empty: a pod without RDMA nodes must not start as if it had them.
    let client = plugin_client(&host.socket());
    let s = rpc_status(
        client.allocate_opt(&alloc_request(&[&["rdma-0"]]), opt()),
        RpcStatusCode::UNAVAILABLE,
    );
    assert!(s.message().contains("uverbs"), "{}", s.message());
    // The driver loads: the directory appears, then a node in it.
    host.add_node("uverbs0");
    let list = kubelet.expect_health("Healthy");
    assert_eq!(list.devices[0].ID, "rdma-0");
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(
        spec_paths(&resp.container_responses[0]),
        ["/dev/infiniband/uverbs0"]
    );
}

#[test]
fn custom_resource_socket_and_shares() {
    let host = Host::new("custom");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(
        &host,
        &[
            "--resource-name",
            "example.org/hca",
            "--socket-name",
            "hca.sock",
            "--shares",
            "3",
        ],
    );
    let (req, _) = kubelet.expect_registered();
    assert_eq!(req.resource_name, "example.org/hca");
    assert_eq!(req.endpoint, "hca.sock");
    let ids: Vec<String> = kubelet
        .expect_list()
        .devices
        .iter()
        .map(|d| d.ID.clone())
        .collect();
    assert_eq!(ids, ["rdma-0", "rdma-1", "rdma-2"]);
    assert!(host.plugin_dir().join("hca.sock").exists());
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    for args in [
        &["--shares", "0"][..],
        &["--resource-name", "rdma"],
        &["--plugin-dir", "relative"],
        &["--no-such-flag"],
    ] {
        let out = plugin_command().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("see --help"), "{args:?}: {err}");
    }
    let out = plugin_command().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--host-root"));
    let out = plugin_command().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("jarvice-rdma-plugin "));
}
