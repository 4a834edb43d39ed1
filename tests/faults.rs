//! Faults and bad input: each one, then proof the plugin still serves correctly.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::thread;
use std::time::Duration;

use common::*;
use grpcio::RpcStatusCode;
use rdma_plugin::kubelet::api;
use rdma_plugin::workers;

fn healthy(list: &api::ListAndWatchResponse) -> bool {
    !list.devices.is_empty() && list.devices.iter().all(|d| d.health == "Healthy")
}

/// Allocate still grants every node: nothing was lost to the fault.
fn still_allocates(host: &Host, want_nodes: usize) {
    let resp = plugin_client(&host.socket())
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .expect("Allocate after the fault");
    assert_eq!(resp.container_responses[0].devices.len(), want_nodes);
}

#[test]
fn plugin_dir_missing_at_start_is_waited_for() {
    let host = Host::new("nodir");
    fs::remove_dir(host.plugin_dir()).unwrap();
    let mut plugin = Plugin::start(&host, &["--poll-interval", "1"]);
    assert!(plugin.wait_log("is this its device-plugin directory"));
    assert!(plugin.child.try_wait().unwrap().is_none(), "still running");
    fs::create_dir(host.plugin_dir()).unwrap();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    kubelet.expect_registered();
    assert!(healthy(&kubelet.expect_list()));
    still_allocates(&host, 3);
}

#[test]
fn a_file_where_the_device_directory_should_be() {
    let host = Host::empty("ibfile");
    fs::write(host.root().join("dev/infiniband"), b"oops").unwrap();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &["--poll-interval", "1"]);
    kubelet.expect_registered();
    kubelet.expect_health("Unhealthy");
    assert!(plugin.wait_log("cannot list"));
    fs::remove_file(host.root().join("dev/infiniband")).unwrap();
    host.add_node("uverbs0");
    kubelet.expect_health("Healthy");
    still_allocates(&host, 1);
}

#[test]
fn a_device_directory_we_may_not_read() {
    let host = Host::new("noread");
    let ib = host.root().join("dev/infiniband");
    fs::set_permissions(&ib, fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(host.plugin_dir(), fs::Permissions::from_mode(0o777)).unwrap();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    // The plugin runs unprivileged: as root, drop to nobody so the permission bites.
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        fs::set_permissions(
            host.plugin_dir().join("kubelet.sock"),
            fs::Permissions::from_mode(0o777),
        )
        .unwrap();
    }
    let plugin = Plugin::start_with(&host, &["--poll-interval", "1"], |cmd| {
        if as_root {
            cmd.uid(65534).gid(65534);
        }
    });
    kubelet.expect_registered();
    kubelet.expect_health("Unhealthy");
    assert!(
        plugin.wait_log("Permission denied"),
        "{}",
        plugin.log_text()
    );
    fs::set_permissions(&ib, fs::Permissions::from_mode(0o755)).unwrap();
    kubelet.expect_health("Healthy");
    still_allocates(&host, 3);
    assert!(plugin.wait_log("device discovery works again"));
}

#[test]
fn garbage_and_half_open_connections_do_not_disturb_serving() {
    let host = Host::new("garbage");
    let (_kubelet, plugin) = start_registered(&host, &[]);

    let mut held = Vec::new();
    for i in 0..30u32 {
        let mut s = UnixStream::connect(host.socket()).unwrap();
        match i % 5 {
            0 => drop(s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
            1 => drop(s.write_all(&[0xff; 4096])),
            // A valid HTTP/2 preface, then a frame header claiming a huge payload.
            2 => drop(s.write_all(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x04\x00\x00\x00\x00\x00",
            )),
            3 => drop(s.shutdown(std::net::Shutdown::Write)),
            _ => {} // connected, silent: half-open
        }
        held.push(s);
    }
    still_allocates(&host, 3);
    let opts = plugin_client(&host.socket())
        .get_device_plugin_options_opt(&api::Empty::new(), opt())
        .unwrap();
    assert!(opts.get_preferred_allocation_available);
    drop(held);
    still_allocates(&host, 3);
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn an_allocate_naming_ten_thousand_ids() {
    let host = Host::new("bigreq");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &["--shares", "4"]);
    kubelet.expect_registered();
    let client = plugin_client(&host.socket());

    // Up to the bound (8,192 IDs per container) a request is served, repeats and all.
    let ids: Vec<String> = (0..8192).map(|i| format!("rdma-{}", i % 4)).collect();
    let mut req = api::AllocateRequest::new();
    let mut c = api::ContainerAllocateRequest::new();
    c.devices_ids = ids;
    req.container_requests.push(c.clone());
    let ok = client.allocate_opt(&req, opt()).unwrap();
    assert_eq!(ok.container_responses[0].devices.len(), 3);

    // Beyond it: refused as too large, before anything is built.
    let mut big = req.clone();
    big.container_requests[0].devices_ids =
        (0..10_000).map(|i| format!("rdma-{}", i % 4)).collect();
    let s = rpc_status(
        client.allocate_opt(&big, opt()),
        RpcStatusCode::RESOURCE_EXHAUSTED,
    );
    assert!(
        s.message().contains("names 10000 device IDs; at most 8192"),
        "{}",
        s.message()
    );

    c.devices_ids.truncate(100);
    c.devices_ids.push(format!("rdma-{}", "9".repeat(5000)));
    req.container_requests[0] = c;
    let s = rpc_status(
        client.allocate_opt(&req, opt()),
        RpcStatusCode::INVALID_ARGUMENT,
    );
    assert!(
        s.message().len() < 400,
        "message is bounded: {} bytes",
        s.message().len()
    );
    still_allocates(&host, 3);
}

#[test]
fn a_thousand_streams_opened_and_closed_leave_no_threads_or_fds() {
    let host = Host::new("streams");
    let (kubelet, plugin) = start_registered(&host, &[]);
    let client = plugin_client(&host.socket());
    // Warm up: grpc starts some threads lazily, and stream threads that finish wait for the
    // next stream (up to a few): fill that pool with concurrent streams first.
    let warm: Vec<_> = (0..8).map(|_| open_watch(&client)).collect();
    drop(warm);
    let mut last = (0, 0);
    assert!(wait_for(WAIT, || {
        thread::sleep(Duration::from_millis(100));
        let now = threads_and_fds(plugin.pid());
        std::mem::replace(&mut last, now) == now
    }));
    let before = threads_and_fds(plugin.pid());

    for i in 0..1000 {
        let mut s = open_watch(&client);
        if i % 2 == 0 {
            s.cancel(); // the client says goodbye
        } // else: dropped mid-stream
    }
    let settled = wait_for(WAIT, || {
        let now = threads_and_fds(plugin.pid());
        now.0 <= before.0 && now.1 <= before.1
    });
    assert!(
        settled,
        "threads/fds before {before:?}, after {:?}",
        threads_and_fds(plugin.pid())
    );
    // The kubelet's own stream was never disturbed and still gets news.
    host.remove_node("uverbs0");
    host.remove_node("uverbs1");
    kubelet.expect_health("Unhealthy");
}

#[test]
fn sigkill_then_restart_reclaims_the_socket() {
    let host = Host::new("kill");
    let (kubelet, mut plugin) = start_registered(&host, &[]);
    plugin.signal(libc::SIGKILL);
    plugin.wait_exit(WAIT).expect("killed");
    assert!(host.socket().exists(), "SIGKILL leaves the socket behind");
    kubelet.expect("the stream to end", |ev| {
        matches!(ev, Event::StreamEnded).then_some(())
    });

    let second = Plugin::start(&host, &[]);
    kubelet.expect_registered();
    assert!(healthy(&kubelet.expect_list()));
    assert!(second.log_text().contains("removing stale socket"));
    still_allocates(&host, 3);
}

#[test]
fn sigterm_with_open_streams_exits_zero_and_removes_the_socket() {
    let host = Host::new("termstreams");
    let (_kubelet, mut plugin) = start_registered(&host, &[]);
    let client = plugin_client(&host.socket());
    let streams: Vec<_> = (0..50).map(|_| open_watch(&client)).collect();
    plugin.signal(libc::SIGTERM);
    let status = plugin.wait_exit(WAIT).expect("exits with streams open");
    assert_eq!(status.code(), Some(0));
    assert!(!host.socket().exists());
    drop(streams);
}

#[test]
fn a_kubelet_slow_to_answer_register() {
    let host = Host::new("slow");
    let behaviour = Behaviour {
        register_delay: Duration::from_secs(2),
        ..Behaviour::default()
    };
    let kubelet = FakeKubelet::start_with(&host.plugin_dir(), behaviour);
    let plugin = Plugin::start(&host, &[]);
    kubelet.expect_registered();
    assert!(healthy(&kubelet.expect_list()));
    assert!(plugin.wait_log("registered jarvice.com/rdma"));
    assert!(
        !plugin.log_text().contains("retrying"),
        "{}",
        plugin.log_text()
    );
}

#[test]
fn a_kubelet_that_never_answers_register_is_retried() {
    let host = Host::new("mute");
    let behaviour = Behaviour {
        register_delay: Duration::from_secs(3600),
        ..Behaviour::default()
    };
    let kubelet = FakeKubelet::start_with(&host.plugin_dir(), behaviour);
    let plugin = Plugin::start(&host, &["--register-timeout", "1"]);
    kubelet.expect_registered();
    kubelet.expect_registered(); // timed out, backed off, tried again
    assert!(
        plugin.wait_log("DEADLINE_EXCEEDED"),
        "{}",
        plugin.log_text()
    );
    still_allocates(&host, 3);
    // A working kubelet replaces it and gets the registration.
    kubelet.stop();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    kubelet.expect_registered();
    assert!(healthy(&kubelet.expect_list()));
    assert!(plugin.wait_log("registered jarvice.com/rdma"));
}

#[test]
fn a_kubelet_that_drops_the_stream_gets_a_new_registration() {
    let host = Host::new("drop");
    let (kubelet, plugin) = start_registered(&host, &[]);
    kubelet.drop_streams();
    kubelet.expect_registered();
    assert!(healthy(&kubelet.expect_list()));
    assert!(plugin.log_text().contains("no ListAndWatch stream open"));
}

#[test]
fn our_socket_deleted_is_served_again() {
    let host = Host::new("unlinked");
    let (kubelet, plugin) = start_registered(&host, &[]);
    fs::remove_file(host.socket()).unwrap();
    kubelet.expect_registered();
    assert!(healthy(&kubelet.expect_list()));
    assert!(plugin.log_text().contains("our socket was removed"));
    still_allocates(&host, 3);
}

#[test]
fn hot_plug_reaches_every_stream_with_stable_ids() {
    let host = Host::new("hotplug");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start(&host, &["--shares", "2"]);
    kubelet.expect_registered();
    let first = kubelet.expect_list();
    let client = plugin_client(&host.socket());
    let mut watcher = open_watch(&client);

    host.add_node("uverbs2");
    let list = kubelet.expect_list();
    assert_eq!(
        healths(&list),
        healths(&first),
        "a node added: same IDs, same health"
    );
    let next = next_list(&mut watcher);
    assert!(
        matches!(next, Some(Some(Ok(_)))),
        "every stream gets the news"
    );
    still_allocates(&host, 4);

    for n in ["uverbs0", "uverbs1", "uverbs2"] {
        host.remove_node(n);
    }
    let list = kubelet.expect_health("Unhealthy");
    assert_eq!(list.devices.len(), 2);
    host.add_node("uverbs0");
    let list = kubelet.expect_health("Healthy");
    assert_eq!(healths(&list), healths(&first));
}

#[test]
fn polling_mode_still_sees_hot_plug_and_kubelet_restarts() {
    let host = Host::empty("poll");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &["--poll", "--poll-interval", "1"]);
    kubelet.expect_registered();
    kubelet.expect_health("Unhealthy");
    host.add_node("uverbs0");
    kubelet.expect_health("Healthy");
    kubelet.stop();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    kubelet.expect_registered();
    assert!(healthy(&kubelet.expect_list()));
    assert!(
        !plugin.log_text().contains("watching"),
        "no inotify watches in --poll mode"
    );
}

#[test]
fn another_process_holding_our_socket_name_is_not_touched() {
    // A live listener at our path: the plugin refuses rather than stealing it.
    let host = Host::new("held");
    let _kubelet = FakeKubelet::start(&host.plugin_dir());
    let other = UnixListener::bind(host.socket()).unwrap();
    let mut plugin = Plugin::start(&host, &[]);
    assert_eq!(plugin.wait_exit(WAIT).and_then(|s| s.code()), Some(1));
    // Still there and still the other process's: it accepts our connection.
    let _client = UnixStream::connect(host.socket()).unwrap();
    other.set_nonblocking(true).unwrap();
    assert!(other.accept().is_ok());
}

#[test]
fn a_file_that_is_not_a_socket_at_our_path_is_never_deleted() {
    let host = Host::new("notsock");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    fs::write(host.socket(), b"precious").unwrap();
    let plugin = Plugin::start(&host, &[]);
    assert!(plugin.wait_log("is not a socket"));
    assert_eq!(fs::read(host.socket()).unwrap(), b"precious");
    // Once the operator moves it away, the plugin serves and registers by itself.
    fs::remove_file(host.socket()).unwrap();
    kubelet.expect_registered();
    still_allocates(&host, 3);
}

#[test]
fn restarts_leave_no_threads_or_fds_behind() {
    let host = Host::new("restarts");
    let (kubelet, plugin) = start_registered(&host, &[]);
    // A first restart, so lazily started grpc threads exist before the baseline.
    plugin.signal(libc::SIGHUP);
    kubelet.expect_registered();
    kubelet.expect_list();
    let before = threads_and_fds(plugin.pid());
    for _ in 0..30 {
        plugin.signal(libc::SIGHUP);
        kubelet.expect_registered();
        kubelet.expect_list();
    }
    // Stream threads that finish wait for the next stream, up to MAX_IDLE of them, so the pool
    // may have grown by that much; a leak per restart would add 30.
    let settled = wait_for(WAIT, || {
        let now = threads_and_fds(plugin.pid());
        now.0 <= before.0 + workers::MAX_IDLE && now.1 <= before.1
    });
    assert!(
        settled,
        "threads/fds before {before:?}, after 30 restarts {:?}",
        threads_and_fds(plugin.pid())
    );
    still_allocates(&host, 3);
}
