//! Exactly one Register per kubelet restart, with the filesystem events in every order the
//! kubelet can produce: its device manager deletes every socket in the plugin dir (ours, the old
//! `kubelet.sock`, in directory order) and then binds a new `kubelet.sock`; the old kubelet may
//! have removed its socket or died leaving it; the new one may start at once or a moment later;
//! an older kubelet may not clean the directory at all. Counted at the kubelets, over 20
//! restarts each, including the stream ends and re-checks that follow.

mod common;

use std::fs;
use std::thread;
use std::time::Duration;

use common::*;

#[derive(Clone, Copy, Debug)]
enum Order {
    /// The old kubelet removes its socket; the new one cleans the dir and binds.
    Clean,
    /// The old kubelet dies leaving `kubelet.sock`; the new one cleans (both sockets go in one
    /// burst of events) and binds.
    Crash,
    /// Died; our socket is deleted, then (a moment later) the stale `kubelet.sock`, then
    /// (another moment later) the new one is bound: three separate batches of events.
    CrashSlow,
    /// The old kubelet dies; the stale `kubelet.sock` goes first, ours a moment later, then the
    /// new one is bound.
    CrashSocketLast,
    /// A kubelet that does not clean the dir: only `kubelet.sock` is replaced.
    NoClean,
}

/// Events up to and including the first list; returns the Register calls among them.
fn until_listed(k: &FakeKubelet) -> usize {
    let mut registers = 0;
    loop {
        match k.next("a Register and a list") {
            Event::Registered { .. } => registers += 1,
            Event::List(_) => return registers,
            _ => {}
        }
    }
}

fn restart(host: &Host, old: &mut FakeKubelet, order: Order) -> FakeKubelet {
    let dir = host.plugin_dir();
    let pause = || thread::sleep(Duration::from_millis(30));
    let quiet = Behaviour {
        clean: false,
        ..Behaviour::default()
    };
    match order {
        Order::Clean => {
            old.stop_in_place();
            FakeKubelet::start(&dir)
        }
        Order::Crash => {
            old.crash();
            FakeKubelet::start(&dir)
        }
        Order::CrashSlow => {
            old.crash();
            let _ = fs::remove_file(host.socket());
            pause();
            let _ = fs::remove_file(dir.join("kubelet.sock"));
            pause();
            FakeKubelet::start_with(&dir, quiet)
        }
        Order::CrashSocketLast => {
            old.crash();
            let _ = fs::remove_file(dir.join("kubelet.sock"));
            pause();
            let _ = fs::remove_file(host.socket());
            FakeKubelet::start_with(&dir, quiet)
        }
        Order::NoClean => {
            old.stop_in_place();
            FakeKubelet::start_with(&dir, quiet)
        }
    }
}

fn one_register_per_restart(order: Order) {
    let host = Host::new(&format!("restarts-{order:?}").to_lowercase());
    let mut kubelets = vec![FakeKubelet::start(&host.plugin_dir())];
    let plugin = Plugin::start(&host, &[]);
    let mut registers = until_listed(&kubelets[0]);
    for i in 0..20 {
        let next = restart(&host, kubelets.last_mut().unwrap(), order);
        registers += until_listed(&next);
        assert_eq!(
            registers,
            i + 2,
            "{order:?}: restart {} gave more than one Register",
            i + 1
        );
        kubelets.push(next);
    }
    // Whatever the stream ends and stream checks that follow do, no further Register.
    thread::sleep(Duration::from_millis(2500));
    let late: usize = kubelets.iter().map(FakeKubelet::registrations).sum();
    assert_eq!(
        late, 0,
        "{order:?}: {late} Register call(s) after the restarts settled"
    );
    assert_eq!(registers, 21);
    assert!(!plugin.log_text().contains("panicked"));
}

#[test]
fn kubelet_cleans_then_binds() {
    one_register_per_restart(Order::Clean);
}

#[test]
fn kubelet_crashed_then_a_new_one_cleans_and_binds() {
    one_register_per_restart(Order::Crash);
}

#[test]
fn our_socket_then_the_stale_kubelet_sock_then_a_new_one_in_separate_batches() {
    one_register_per_restart(Order::CrashSlow);
}

#[test]
fn the_stale_kubelet_sock_then_our_socket_then_a_new_one() {
    one_register_per_restart(Order::CrashSocketLast);
}

#[test]
fn a_kubelet_that_does_not_clean_the_dir() {
    one_register_per_restart(Order::NoClean);
}

#[test]
fn a_chmod_of_kubelet_sock_is_not_a_new_kubelet() {
    let host = Host::new("chmod");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &[]);
    assert_eq!(until_listed(&kubelet), 1);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        host.plugin_dir().join("kubelet.sock"),
        fs::Permissions::from_mode(0o660),
    )
    .unwrap();
    // Something else wakes the loop (a device node), and a self-check would look too.
    host.add_node("uverbs7");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(kubelet.registrations(), 0, "no second Register");
    assert!(!plugin.log_text().contains("panicked"));
}
