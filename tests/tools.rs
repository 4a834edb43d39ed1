//! The operator subcommands of the same binary: `list` (no kubelet needed) and `probe`.

mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn list_prints_the_advertised_devices_and_the_allocate_answer() {
    let host = Host::new("list");
    fs::write(host.root().join("dev/knem"), b"").unwrap();
    fs::create_dir_all(
        host.root()
            .join("sys/class/infiniband_verbs/uverbs0/device"),
    )
    .unwrap();
    fs::create_dir_all(
        host.root()
            .join("sys/class/infiniband_verbs/uverbs1/device"),
    )
    .unwrap();
    fs::write(
        host.root()
            .join("sys/class/infiniband_verbs/uverbs0/device/numa_node"),
        "1\n",
    )
    .unwrap();
    fs::write(
        host.root()
            .join("sys/class/infiniband_verbs/uverbs1/device/numa_node"),
        "0\n",
    )
    .unwrap();

    let out = run(&host, &["list", "--shares", "2"]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("resource  jarvice.com/rdma"), "{text}");
    assert!(text.contains("rdma-1      Healthy     0,1"), "{text}");
    assert!(
        text.contains("/dev/infiniband/uverbs1 -> /dev/infiniband/uverbs1 rw"),
        "{text}"
    );
    assert!(text.contains("/dev/knem -> /dev/knem rw"), "{text}");

    let out = run(&host, &["list", "--json"]);
    assert!(out.status.success());
    let json = stdout(&out);
    assert!(
        json.starts_with("{\"resource_name\":\"jarvice.com/rdma\""),
        "{json}"
    );
    assert!(
        json.contains(
            "\"devices\":[{\"id\":\"rdma-0\",\"health\":\"Healthy\",\"numa_nodes\":[0,1]}]"
        ),
        "{json}"
    );
    assert!(
        json.contains("{\"container_path\":\"/dev/infiniband/rdma_cm\",\"host_path\":\"/dev/infiniband/rdma_cm\",\"permissions\":\"rw\"}"),
        "{json}"
    );
    // Valid JSON as far as python's parser is concerned, when python is there.
    if let Ok(py) = Command::new("python3")
        .args([
            "-c",
            "import json,sys; d=json.load(sys.stdin); print(len(d['allocate']['devices']))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        let mut py = py;
        py.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
        let res = py.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&res.stdout).trim(), "4");
    }
}

#[test]
fn list_on_a_host_without_a_driver_says_so() {
    let host = Host::empty("list-empty");
    let out = run(&host, &["list"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("rdma-0      Unhealthy"), "{text}");
    assert!(text.contains("no device nodes found"), "{text}");
}

#[test]
fn list_fails_clearly_when_the_device_dir_is_unreadable() {
    let host = Host::empty("list-bad");
    fs::write(host.root().join("dev/infiniband"), b"not a directory").unwrap();
    let out = run(&host, &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot list") && err.contains("dev/infiniband"),
        "{err}"
    );
}

#[test]
fn probe_passes_against_a_serving_plugin_and_fails_without_one() {
    let host = Host::new("probe");
    let out = run(&host, &["probe"]);
    assert_eq!(out.status.code(), Some(1), "no plugin yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugin not serving"));

    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut plugin = Plugin::start(&host, &["--shares", "2"]);
    kubelet.expect_registered();
    let out = run(&host, &["probe"]);
    assert!(out.status.success(), "{out:?}\n{}", plugin.log_text());
    let text = stdout(&out);
    assert!(
        text.contains("get_preferred_allocation_available=true"),
        "{text}"
    );
    assert!(text.contains("device rdma-1 Healthy"), "{text}");
    assert!(text.contains("ok: "), "{text}");

    // A socket file that nobody serves any more (SIGKILL leaves it behind) fails the probe.
    plugin.signal(libc::SIGKILL);
    plugin.wait_exit(WAIT).expect("killed");
    assert!(host.socket().exists());
    let out = run(&host, &["probe"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed"),
        "{out:?}"
    );
}
