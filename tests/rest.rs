//! With no kubelet the plugin rests: no server, no socket, and gRPC shut down, so the process is
//! its main thread alone, asleep in poll(2). A kubelet that comes back (after a clean stop or a
//! crash that left its socket behind) is served and registered with as before, gRPC started anew.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

/// gRPC lingers 5 s after the last server stopped (a kubelet restart must not tear it down);
/// the rest is slack for slow (emulated) runs.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(40);

fn threads(plugin: &Plugin) -> usize {
    threads_and_fds(plugin.pid()).0
}

/// The threads of a process with one thread of its own: qemu-user adds its RCU thread.
fn one_thread() -> usize {
    if under_emulation() {
        2
    } else {
        1
    }
}

/// The plugin is down to its main thread: no gRPC thread, no stream thread.
fn wait_one_thread(plugin: &Plugin) {
    assert!(
        wait_for(SHUTDOWN_WAIT, || threads(plugin) == one_thread()),
        "{} threads left; log:\n{}",
        threads(plugin),
        plugin.log_text()
    );
}

/// A kubelet gets registered with, lists the device, and Allocate works.
fn served_by(host: &Host, kubelet: &FakeKubelet) {
    let (req, _) = kubelet.expect_registered();
    assert_eq!(req.resource_name, "jarvice.com/rdma");
    assert_eq!(kubelet.expect_list().devices.len(), 1);
    let resp = plugin_client(&host.socket())
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    assert_eq!(resp.container_responses.len(), 1);
}

#[test]
fn without_a_kubelet_it_runs_one_thread_and_no_socket() {
    let host = Host::new("rest-start");
    let plugin = Plugin::start(&host, &[]);
    assert!(plugin.wait_log("is the kubelet running?"));
    // Nothing starts later on its own: no timer, no retry.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(threads(&plugin), one_thread(), "{}", plugin.log_text());
    assert!(!host.socket().exists(), "serves nobody without a kubelet");
    assert!(!plugin.log_text().contains("serving the device plugin"));

    let kubelet = FakeKubelet::start(&host.plugin_dir());
    served_by(&host, &kubelet);
    assert!(
        threads(&plugin) > one_thread(),
        "gRPC runs while a kubelet is there"
    );
}

/// Voluntary and involuntary context switches of the process's main thread so far.
fn main_thread_switches(plugin: &Plugin) -> u64 {
    let pid = plugin.pid();
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn resting_it_polls_nothing_even_with_no_device_directory_to_watch() {
    // No dev/infiniband: serving, the plugin would poll for it every second. Resting, only
    // kubelet.sock matters, and the plugin dir is watched.
    let host = Host::empty("rest-nodrv");
    let plugin = Plugin::start(&host, &["--poll-interval", "1"]);
    assert!(plugin.wait_log("is the kubelet running?"));
    thread::sleep(Duration::from_millis(300));
    let before = main_thread_switches(&plugin);
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        main_thread_switches(&plugin),
        before,
        "the main thread woke while resting"
    );
    assert_eq!(threads(&plugin), one_thread());

    let kubelet = FakeKubelet::start(&host.plugin_dir());
    kubelet.expect_registered();
    kubelet.expect_health("Unhealthy");
    // Serving, it looks for the driver's directory again.
    host.add_node("uverbs0");
    kubelet.expect_health("Healthy");
}

#[test]
fn a_kubelet_that_stops_and_returns_is_served_each_time_with_grpc_restarted() {
    let host = Host::new("rest-cycle");
    let (kubelet, plugin) = start_registered(&host, &[]);
    let mut kubelet = Some(kubelet);
    for round in 1..=3 {
        // A clean stop removes kubelet.sock: our server and socket go at once, gRPC after
        // its linger.
        kubelet.take().unwrap().stop();
        assert!(
            wait_for(WAIT, || !host.socket().exists()),
            "round {round}: socket removed"
        );
        wait_one_thread(&plugin);
        let k = FakeKubelet::start(&host.plugin_dir());
        served_by(&host, &k);
        kubelet = Some(k);
    }
    let log = plugin.log_text();
    assert_eq!(log.matches("gRPC shut down").count(), 3, "{log}");
    assert_eq!(log.matches("gRPC started again").count(), 3, "{log}");
}

#[test]
fn a_dead_kubelets_socket_is_given_up_until_a_new_kubelet_comes() {
    let host = Host::new("rest-dead");
    let (mut kubelet, plugin) = start_registered(&host, &[]);
    // Killed: kubelet.sock stays behind, refusing connections.
    kubelet.crash();
    assert!(host.plugin_dir().join("kubelet.sock").exists());
    assert!(
        wait_for(SHUTDOWN_WAIT, || plugin
            .log_text()
            .contains("has not answered for")),
        "{}",
        plugin.log_text()
    );
    // Said as the resource starts resting; the socket goes with the server right after.
    assert!(wait_for(WAIT, || !host.socket().exists()));
    wait_one_thread(&plugin);

    let kubelet = FakeKubelet::start(&host.plugin_dir());
    served_by(&host, &kubelet);
}

#[test]
fn a_file_in_the_way_of_our_socket_does_not_start_grpc_on_every_retry() {
    let host = Host::new("rest-file");
    let (kubelet, plugin) = start_registered(&host, &[]);
    // Something puts a file where our socket was: we may not remove it, so we cannot serve.
    std::fs::remove_file(host.socket()).unwrap();
    std::fs::write(host.socket(), b"not ours").unwrap();
    assert!(plugin.wait_log("is not a socket"));
    // Nothing serves: gRPC goes after its linger, and the retries (every 10 s at most) do not
    // start it again, since the path is checked first.
    assert!(wait_for(SHUTDOWN_WAIT, || plugin
        .log_text()
        .contains("gRPC shut down")));
    let retries = |log: &str| log.matches("retrying in").count();
    let at_shutdown = retries(&plugin.log_text());
    assert!(
        wait_for(SHUTDOWN_WAIT, || retries(&plugin.log_text())
            >= at_shutdown + 2),
        "{}",
        plugin.log_text()
    );
    assert!(!plugin.log_text().contains("gRPC started again"));
    wait_one_thread(&plugin);

    // The file goes: served and registered again at the next retry, gRPC started once.
    std::fs::remove_file(host.socket()).unwrap();
    kubelet.expect_registered();
    assert_eq!(plugin.log_text().matches("gRPC started again").count(), 1);
}

#[test]
fn a_flapping_kubelet_sock_leaves_one_register_for_the_kubelet_that_stays() {
    let host = Host::new("rest-flap");
    let mut plugin = Plugin::start(&host, &[]);
    assert!(plugin.wait_log("is the kubelet running?"));
    let sock = host.plugin_dir().join("kubelet.sock");
    // Dead sockets appearing and vanishing as fast as we can: each may start a server; none
    // answers a Register.
    for _ in 0..200 {
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        std::fs::remove_file(&sock).unwrap();
    }
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    served_by(&host, &kubelet);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        kubelet.registrations(),
        0,
        "one Register for the kubelet that stayed"
    );
    assert!(plugin.child.try_wait().unwrap().is_none(), "still running");
    assert!(!plugin.log_text().contains("panicked"));
}
