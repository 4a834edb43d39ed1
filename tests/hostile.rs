//! The plugin as an attacker on the node, or a kubelet under stress, would try it: what a device
//! tree can hold, what a client on our socket can send, what can sit at our socket path, and
//! resource limits. Every case ends with the plugin answering or exiting cleanly, a clear error
//! or log line, and nothing outside its own socket touched.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use grpcio::RpcStatusCode;
use rdma_plugin::kubelet::api;

#[test]
fn a_device_tree_cannot_smuggle_devices_or_forge_log_lines() {
    let host = Host::new("smuggle");
    let ib = host.root().join("dev/infiniband");
    symlink("/etc/passwd", ib.join("uverbs5")).unwrap();
    symlink("../../../../../../etc/shadow", ib.join("uverbs6")).unwrap();
    fs::write(ib.join("uverbs7\n[ERROR] forged record"), b"").unwrap();
    // /dev/knem as a link to another device, and a verbs name with /dev/mem's numbers.
    let dev = host.root().join("dev");
    let root = mknod(&dev.join("mem"), 1, 1);
    if root {
        symlink("mem", dev.join("knem")).unwrap();
        mock_dev(&host, "class/misc/knem/dev", "10:60");
        assert!(mknod(&ib.join("uverbs8"), 1, 1));
        mock_dev(&host, "class/infiniband_verbs/uverbs8/dev", "231:200");
    } else {
        eprintln!("mknod not permitted (not root): character device cases skipped");
    }
    let (_kubelet, plugin) = start_registered(&host, &[]);
    let resp = plugin_client(&host.socket())
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
    assert!(plugin.wait_log(
        "refusing /dev/infiniband/uverbs5: a symlink to \"/etc/passwd\", outside its directory"
    ));
    assert!(plugin.wait_log("refusing /dev/infiniband/uverbs6: a symlink to"));
    if root {
        assert!(plugin.wait_log(
            "refusing /dev/infiniband/uverbs8: a character device 1:1, but sysfs says 231:200"
        ));
        assert!(plugin.wait_log("refusing /dev/knem: a character device 1:1, but sysfs says 10:60"));
    }
    let log = plugin.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("[ERROR] forged")),
        "a file name forged a log record:\n{log}"
    );
    // `list` and `diagnose` say why.
    let text = stdout(&run(&host, &["list"]));
    assert!(
        text.contains("REFUSED (named like device nodes, never granted)"),
        "{text}"
    );
    assert!(
        text.contains("/dev/infiniband/uverbs5: a symlink to \"/etc/passwd\""),
        "{text}"
    );
    let text = stdout(&run(&host, &["diagnose"]));
    assert!(
        text.contains("fail device nodes: /dev/infiniband/uverbs5 refused:"),
        "{text}"
    );
}

fn mock_dev(host: &Host, rel: &str, numbers: &str) {
    rdma_plugin::host::mock::write(&host.sys().join(rel), &format!("{numbers}\n")).unwrap();
}

#[test]
fn our_socket_is_private_whatever_the_umask() {
    let host = Host::new("umask");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start_with(&host, &[], |cmd| {
        // SAFETY (test): umask between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
    });
    kubelet.expect_registered();
    let mode = fs::metadata(host.socket()).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o077,
        0,
        "socket mode {mode:o}: others could call every RPC"
    );
}

#[test]
fn at_exit_only_our_socket_is_removed() {
    let host = Host::new("notours");
    let (_kubelet, mut plugin) = start_registered(&host, &[]);
    // Someone moves a file of their own over our socket.
    let theirs = host.plugin_dir().join("theirs.tmp");
    fs::write(&theirs, b"someone else's").unwrap();
    fs::rename(&theirs, host.socket()).unwrap();
    assert!(plugin.wait_log("our socket was removed"));
    assert!(plugin.wait_log("exists and is not a socket: refusing to remove it"));
    plugin.signal(libc::SIGTERM);
    let status = plugin.wait_exit(WAIT).expect("exits");
    assert!(status.success(), "{status}");
    assert_eq!(fs::read(host.socket()).unwrap(), b"someone else's");
}

#[test]
fn a_low_open_files_limit_is_raised_or_refused_clearly() {
    if under_emulation() {
        eprintln!("under an emulator the limit would bind the emulator's own descriptors: skipped");
        return;
    }
    let host = Host::new("nofile");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut plugin = Plugin::start_with(&host, &[], with_limit(Rlimit::Nofile, 16, 16));
    let status = plugin.wait_exit(WAIT).expect("refuses to start");
    assert_eq!(status.code(), Some(1));
    assert!(
        plugin.log_text().contains(
            "refusing to start: the open-files limit is 16 (hard limit 16): at least 64 are needed"
        ),
        "{}",
        plugin.log_text()
    );
    drop(plugin);

    let plugin = Plugin::start_with(&host, &[], with_limit(Rlimit::Nofile, 16, 4096));
    kubelet.expect_registered();
    assert!(plugin.wait_log("open-files limit raised from 16 to 4096"));
}

#[test]
fn discovery_errors_are_not_called_a_missing_driver() {
    let host = Host::empty("discerr");
    symlink("infiniband", host.root().join("dev/infiniband")).unwrap();
    let (_kubelet, _plugin) = start_registered(&host, &[]);
    let status = rpc_status(
        plugin_client(&host.socket()).allocate_opt(&alloc_request(&[&["rdma-0"]]), opt()),
        RpcStatusCode::UNAVAILABLE,
    );
    assert!(
        status
            .message()
            .starts_with("cannot discover the device nodes right now: cannot list"),
        "{}",
        status.message()
    );
}

#[test]
fn fifty_streams_under_a_256_mib_address_space_limit() {
    if under_emulation() {
        eprintln!("under an emulator RLIMIT_AS binds the emulator's guest space: skipped");
        return;
    }
    let host = Host::new("rlimit-as");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start_with(&host, &[], with_limit(Rlimit::As, 256 << 20, 256 << 20));
    kubelet.expect_registered();
    kubelet.expect_list();
    let client = plugin_client(&host.socket());
    let streams: Vec<_> = (0..50).map(|_| open_watch(&client)).collect();
    assert_eq!(streams.len(), 50);
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(resp.container_responses[0].devices.len(), 3);
}

#[test]
fn a_sighup_storm_is_merged_and_leaves_nothing_behind() {
    let host = Host::new("hupstorm");
    let (kubelet, plugin) = start_registered(&host, &[]);
    let client = plugin_client(&host.socket());
    drop(open_watch(&client));
    thread::sleep(Duration::from_millis(300));
    let (threads_before, _) = threads_and_fds(plugin.pid());
    let rss_before = peak_rss_kib(plugin.pid());
    let start = Instant::now();
    for _ in 0..1000 {
        plugin.signal(libc::SIGHUP);
        thread::sleep(Duration::from_millis(2));
    }
    let storm = start.elapsed();
    eprintln!("1,000 SIGHUPs sent in {storm:?}");
    // Settled: registered, listed, streams re-opened.
    thread::sleep(Duration::from_millis(1500));
    let restarts = plugin
        .log_text()
        .matches("SIGHUP: serving and registering")
        .count();
    eprintln!("{restarts} restarts");
    // One restart per 100 ms at most, and one for the signals still pending at the end.
    let bound = (storm.as_millis() / 100) as usize + 2;
    assert!(
        (1..=bound).contains(&restarts),
        "{restarts} restarts for 1,000 SIGHUPs in {storm:?} (bound {bound})"
    );
    let (threads_after, _) = threads_and_fds(plugin.pid());
    assert!(
        threads_after <= threads_before + rdma_plugin::workers::MAX_IDLE,
        "threads {threads_before} -> {threads_after}"
    );
    let rss_after = peak_rss_kib(plugin.pid());
    // Under an emulator the figure is the emulator's (its code cache grows with restarts).
    assert!(
        under_emulation() || rss_after < rss_before + 16 * 1024,
        "peak RSS {rss_before} KiB -> {rss_after} KiB"
    );
    // Still serving, and registered with the kubelet.
    assert!(client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .is_ok());
    let mut registered = false;
    while let Some(ev) = kubelet.next_within(Duration::from_millis(200)) {
        registered |= matches!(ev, Event::Registered { .. });
    }
    assert!(registered || restarts == 0);
}

#[test]
fn what_a_client_may_send_and_what_it_gets_beyond_that() {
    let host = Host::new("client");
    let (_kubelet, plugin) = start_registered(&host, &[]);
    let client = plugin_client(&host.socket());

    // Empty: refused, named.
    let s = rpc_status(
        client.allocate_opt(&api::AllocateRequest::new(), opt()),
        RpcStatusCode::INVALID_ARGUMENT,
    );
    assert_eq!(s.message(), "request names no containers");

    // Too many containers: refused before anything is built.
    let many: Vec<&[&str]> = (0..200).map(|_| &["rdma-0"][..]).collect();
    let s = rpc_status(
        client.allocate_opt(&alloc_request(&many), opt()),
        RpcStatusCode::RESOURCE_EXHAUSTED,
    );
    assert!(
        s.message().contains("200 container requests; at most 128"),
        "{}",
        s.message()
    );

    // Larger than any kubelet sends (2 MiB): gRPC refuses to read it.
    let mut huge = alloc_request(&[&["rdma-0"]]);
    huge.container_requests[0].devices_ids = vec!["x".repeat(1 << 21)];
    let s = rpc_status(
        client.allocate_opt(&huge, opt()),
        RpcStatusCode::RESOURCE_EXHAUSTED,
    );
    assert!(s.message().contains("larger than max"), "{}", s.message());

    // A preferred-allocation size far beyond what is offered: answered with what is offered.
    let mut c = api::ContainerPreferredAllocationRequest::new();
    c.available_deviceIDs = vec!["rdma-0".into()];
    c.allocation_size = i32::MAX;
    let mut req = api::PreferredAllocationRequest::new();
    req.container_requests.push(c);
    let resp = client.get_preferred_allocation_opt(&req, opt()).unwrap();
    assert_eq!(resp.container_responses[0].deviceIDs, ["rdma-0"]);
    let mut c = api::ContainerPreferredAllocationRequest::new();
    c.available_deviceIDs = (0..10_000).map(|i| format!("rdma-{i}")).collect();
    c.allocation_size = 1;
    let mut req = api::PreferredAllocationRequest::new();
    req.container_requests.push(c);
    rpc_status(
        client.get_preferred_allocation_opt(&req, opt()),
        RpcStatusCode::RESOURCE_EXHAUSTED,
    );

    // Streams beyond the bound are refused; the ones within it (and the kubelet's) are served.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..80 {
        let mut s = client
            .list_and_watch_opt(&api::Empty::new(), opt())
            .unwrap();
        match next_list(&mut s) {
            Some(Some(Ok(_))) => open.push(s),
            Some(Some(Err(grpcio::Error::RpcFailure(st)))) => {
                assert_eq!(st.code(), RpcStatusCode::RESOURCE_EXHAUSTED);
                refused += 1;
            }
            other => panic!("stream: {other:?}"),
        }
    }
    assert_eq!(open.len() + 1, rdma_plugin::kubelet::stream::MAX_STREAMS);
    assert_eq!(refused, 80 + 1 - rdma_plugin::kubelet::stream::MAX_STREAMS);
    drop(open);

    // Hundreds of raw connections that send garbage and hang on: serving goes on.
    let conns: Vec<UnixStream> = (0..300)
        .filter_map(|_| {
            let mut c = UnixStream::connect(host.socket()).ok()?;
            let _ = c.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff");
            Some(c)
        })
        .collect();
    assert!(conns.len() > 250, "{} connections accepted", conns.len());
    let resp = client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(resp.container_responses[0].devices.len(), 3);
    drop(conns);
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn the_largest_answer_stays_within_the_daemonsets_memory_limit() {
    // 128 nodes x 128 containers = 16,384 device specs: the most one answer may hold.
    let host = Host::empty("largest");
    for i in 0..128 {
        host.add_node(&format!("uverbs{i}"));
    }
    let (kubelet, plugin) = start_registered(&host, &[]);
    let client = plugin_client(&host.socket());
    let containers: Vec<&[&str]> = (0..128).map(|_| &["rdma-0"][..]).collect();
    let resp = client
        .allocate_opt(&alloc_request(&containers), opt())
        .unwrap();
    assert_eq!(resp.container_responses.len(), 128);
    assert_eq!(resp.container_responses[0].devices.len(), 128);
    // One node more (read, and sent to the kubelet) and the same request is over the bound.
    host.add_node("uverbs128");
    kubelet.expect_list();
    let s = rpc_status(
        client.allocate_opt(&alloc_request(&containers), opt()),
        RpcStatusCode::RESOURCE_EXHAUSTED,
    );
    assert!(
        s.message().contains("at most 16384 per answer"),
        "{}",
        s.message()
    );
    let peak = peak_rss_kib(plugin.pid());
    eprintln!("peak RSS after the largest answer: {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB over the DaemonSet's 64 MiB limit"
    );
}

/// The plugin under 60 MB of address space, with a dead kubelet's socket (so it serves and
/// starts gRPC, but no Register call runs short of memory): the glibc build serves, but gRPC
/// cannot start all its threads, and a server teardown then never completes (the musl build may
/// get its threads). `None` under an emulator, where RLIMIT_AS binds the emulator's guest space.
fn short_of_threads(tag: &str) -> Option<(Host, Plugin)> {
    if under_emulation() {
        eprintln!("under an emulator RLIMIT_AS binds the emulator's guest space: skipped");
        return None;
    }
    let host = Host::new(tag);
    drop(std::os::unix::net::UnixListener::bind(host.plugin_dir().join("kubelet.sock")).unwrap());
    let plugin = Plugin::start_with(&host, &[], with_limit(Rlimit::As, 60 << 20, 60 << 20));
    Some((host, plugin))
}

/// SIGTERM ends the process within seconds, exit 0, its socket removed.
fn sigterm_ends_it(host: &Host, mut plugin: Plugin) {
    let t0 = Instant::now();
    plugin.signal(libc::SIGTERM);
    let status = plugin
        .wait_exit(Duration::from_secs(10))
        .expect("ends within seconds");
    eprintln!("exited after {:?}: {status}", t0.elapsed());
    assert!(status.success(), "{status}");
    // From the main loop, or from the signal handler while a teardown hangs.
    let log = plugin.log_text();
    assert!(
        log.contains("signal 15 received") || log.contains("termination signal received"),
        "{log}"
    );
    assert!(!host.socket().exists(), "our socket removed");
}

#[test]
fn sigterm_ends_the_process_while_resting_hangs_in_grpc_short_of_threads() {
    // The stop comes from resting (the kubelet's socket is a dead one's): the teardown runs on
    // the main thread, which reads signals.
    let Some((host, plugin)) = short_of_threads("restnothreads") else {
        return;
    };
    assert!(
        wait_for(Duration::from_secs(40), || plugin
            .log_text()
            .contains("has not answered for")),
        "{}",
        plugin.log_text()
    );
    thread::sleep(Duration::from_millis(500));
    sigterm_ends_it(&host, plugin);
}

#[test]
fn sigterm_ends_the_process_even_when_grpc_has_no_threads() {
    let Some((host, plugin)) = short_of_threads("nothreads") else {
        return;
    };
    assert!(
        wait_for(WAIT, || host.socket().exists()),
        "{}",
        plugin.log_text()
    );
    sigterm_ends_it(&host, plugin);
}
