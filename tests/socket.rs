//! Our socket path is ours only while the file there is the socket we bound: a socket another
//! process put there survives our restarts and our exit (gRPC C-core unlinks whatever socket is
//! at its listening path when it shuts down: `tcp_server_posix.cc` `deactivated_all_ports`),
//! and a plugin dir deleted and made again is seen through its parent at once, not by a poll.

mod common;

use std::fs;
use std::os::unix::net::{UnixListener, UnixStream};

use common::*;

/// Someone else's listener at our socket path, bound after ours was deleted.
fn take_path(host: &Host) -> UnixListener {
    fs::remove_file(host.socket()).unwrap();
    UnixListener::bind(host.socket()).expect("bind at the plugin's path")
}

fn still_theirs(host: &Host) {
    assert!(host.socket().exists(), "their socket file is gone");
    UnixStream::connect(host.socket()).expect("their socket still answers");
}

#[test]
fn a_listener_that_took_our_path_keeps_it_when_we_restart_and_give_up() {
    let host = Host::new("sockthief");
    let (_kubelet, mut plugin) = start_registered(&host, &[]);
    let _theirs = take_path(&host);
    // We notice (inotify), stop our server, find theirs answering and exit as a second
    // instance would: their socket stays, and says so in our log.
    let status = plugin.wait_exit(WAIT).expect("exits: the path is taken");
    assert_eq!(status.code(), Some(1), "{}", plugin.log_text());
    assert!(plugin
        .log_text()
        .contains("answers connections: another plugin instance is serving it"));
    still_theirs(&host);
}

#[test]
fn sigterm_leaves_a_socket_someone_else_put_at_our_path() {
    let host = Host::new("sockexit");
    // Nothing wakes the loop before the signal: no inotify, no poll, no self-check.
    let (_kubelet, mut plugin) = start_registered(
        &host,
        &["--poll", "--poll-interval", "3600", "--self-check", "0"],
    );
    let _theirs = take_path(&host);
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait_exit(WAIT).expect("exits").success());
    still_theirs(&host);
    // gRPC listened on a private name, gone since we published the socket.
    let leftovers: Vec<String> = fs::read_dir(host.plugin_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".jrp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn our_own_socket_is_removed_at_exit_and_restarts_leave_no_private_names() {
    let host = Host::new("sockown");
    let (kubelet, mut plugin) = start_registered(&host, &[]);
    for _ in 0..3 {
        plugin.signal(libc::SIGHUP);
        kubelet.expect_registered();
    }
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait_exit(WAIT).expect("exits").success());
    let left: Vec<String> = fs::read_dir(host.plugin_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "kubelet.sock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_plugin_dir_made_again_is_registered_with_at_once() {
    let host = Host::new("dirback");
    // A poll could not rescue it within the test's wait: only an event can.
    let (kubelet, plugin) = start_registered(&host, &["--poll-interval", "3600"]);
    kubelet.stop();
    // A kubelet reinstall: the directory goes (moved away, then removed) and comes back, once
    // the plugin has seen it gone (it tried to watch it again, and could not) and has nothing
    // left to wake it (gRPC shut down 5 s after the kubelet went).
    let aside = host.tmp.path().join("plugins-old");
    fs::rename(host.plugin_dir(), &aside).unwrap();
    fs::remove_dir_all(&aside).unwrap();
    assert!(plugin.wait_log(&format!("cannot watch {} yet", host.plugin_dir().display())));
    assert!(plugin.wait_log("nothing to serve: gRPC"));
    fs::create_dir(host.plugin_dir()).unwrap();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let (req, _) = kubelet.expect_registered();
    assert_eq!(req.endpoint, "rdma.sock");
    kubelet.expect_list();
}

#[test]
fn another_users_socket_we_cannot_connect_to_is_left_alone() {
    // The DaemonSet drops every capability: root without CAP_DAC_OVERRIDE cannot connect to
    // another user's 0700 socket (EACCES), which proves nothing about it being stale.
    let drop_caps = ["--inh-caps=-all", "--bounding-set=-all", "--"];
    let usable = std::process::Command::new("setpriv")
        .args(drop_caps)
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        eprintln!("setpriv cannot drop capabilities here: skipped");
        return;
    }
    let host = Host::new("sockeacces");
    let _kubelet = FakeKubelet::start(&host.plugin_dir());
    let _theirs = UnixListener::bind(host.socket()).unwrap();
    std::os::unix::fs::chown(host.socket(), Some(65534), Some(65534)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(host.socket(), fs::Permissions::from_mode(0o700)).unwrap();

    let log = host.tmp.path().join("plugin-nocaps.log");
    let runner = std::env::var("JARVICE_TEST_RUNNER").unwrap_or_default();
    let child = std::process::Command::new("setpriv")
        .args(drop_caps)
        .args(runner.split_whitespace())
        .arg(plugin_bin())
        .args(host.args())
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the plugin without capabilities");
    let plugin = Plugin { child, log };
    assert!(plugin.wait_log("someone else's, leaving it alone"));
    still_theirs(&host);
}

#[test]
fn a_plugin_dir_deleted_on_the_host_under_a_running_plugin_ends_it() {
    // As in a pod: the plugin dir is a bind mount (hostPath) of the host's. A kubelet
    // reinstall stops the kubelet and deletes the directory: the mount keeps the deleted one,
    // with no event for it, and the new kubelet's directory is out of reach. The plugin looks
    // again shortly after the kubelet's socket goes, finds the directory deleted, and exits
    // so that a new container mounts the new one.
    if !mount_namespaces() {
        eprintln!("no mount namespace to be had here (or under an emulator): skipped");
        return;
    }
    let host = Host::new("dirstale");
    let in_pod = host.tmp.path().join("pod-plugins");
    fs::create_dir(&in_pod).unwrap();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let log = host.tmp.path().join("plugin-dirstale.log");
    let script = format!(
        "mount --bind {} {} && exec \"$@\"",
        host.plugin_dir().display(),
        in_pod.display()
    );
    let root = host.root().display().to_string();
    let sys = host.sys().display().to_string();
    let child = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script, "sh"])
        .arg(plugin_bin())
        .args(["--plugin-dir", &in_pod.display().to_string()])
        .args(["--host-root", &root, "--sysfs", &sys])
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut plugin = Plugin { child, log };
    kubelet.expect_registered();
    kubelet.stop();
    assert!(plugin.wait_log("Not serving jarvice.com/rdma"));
    fs::remove_dir_all(host.plugin_dir()).unwrap();
    fs::create_dir(host.plugin_dir()).unwrap();
    let status = plugin.wait_exit(WAIT).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", plugin.log_text());
    assert!(plugin
        .log_text()
        .contains("was deleted on the host and this container still has the old one mounted"));
}
