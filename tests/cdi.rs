//! CDI that cannot fail silently (`--cdi`): the spec is a state the daemon keeps (deleted,
//! emptied, replaced or its directory gone: restored; unwritable: the resource is Unhealthy),
//! and Allocate carries the device specs with the CDI names unless `--cdi-only`, because a
//! runtime without CDI drops the names without a word (containerd 1.6; DRA-CONTRACT.md §7).
//! The real binary, our fake kubelet, a temp CDI dir.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const RDMA: &str = "jarvice.com/rdma";

/// A host, a kubelet and the plugin with `--cdi` into `<tmp>/run/cdi`, registered and serving.
/// Fields drop in order: the plugin first, so that it cannot restore a spec into a temp tree
/// being removed.
struct Cdi {
    plugin: Plugin,
    kubelet: FakeKubelet,
    dir: PathBuf,
    spec: PathBuf,
    host: Host,
}

impl Cdi {
    fn start(tag: &str, extra: &[&str]) -> Cdi {
        let host = Host::with_hcas(tag);
        let dir = host.tmp.path().join("run/cdi");
        // The runtime's /var/run: the plugin makes only the cdi dir in it.
        fs::create_dir(host.tmp.path().join("run")).unwrap();
        let arg = dir.display().to_string();
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        let mut args = vec!["--cdi", "--cdi-dir", &arg];
        args.extend(extra);
        let plugin = Plugin::start(&host, &args);
        kubelet.expect_health("Healthy");
        let spec = dir.join("jarvice.com_rdma.json");
        assert!(wait_for(WAIT, || spec.exists()), "spec written");
        Cdi {
            host,
            kubelet,
            plugin,
            dir,
            spec,
        }
    }

    /// `diagnose --cdi` with this spec dir (and `extra` flags): its text.
    fn diagnose(&self, extra: &[&str]) -> String {
        let dir = self.dir.display().to_string();
        let mut args = vec!["diagnose", "--cdi", "--cdi-dir", &dir];
        args.extend(extra);
        stdout(&run(&self.host, &args))
    }

    fn allocate(&self) -> rdma_plugin::kubelet::api::ContainerAllocateResponse {
        plugin_client(&self.host.socket())
            .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
            .unwrap()
            .container_responses[0]
            .clone()
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_spec_deleted_emptied_replaced_or_without_its_dir_is_restored_and_logged() {
    let t = Cdi::start("cdikeep", &[]);
    let good = read(&t.spec);
    assert!(good.starts_with("{\"cdiVersion\":\"0.6.0\",\"kind\":\"jarvice.com/rdma\""));
    let restored = || wait_for(WAIT, || read(&t.spec) == good);

    fs::remove_file(&t.spec).unwrap();
    assert!(restored(), "deleted: restored");
    assert!(t
        .plugin
        .wait_log("jarvice.com_rdma.json was deleted by someone else: restored"));

    fs::write(&t.spec, b"").unwrap();
    assert!(restored(), "emptied: restored");

    // Replaced by another file with other content (a rename over it, as a tool would).
    let other = t.dir.join("other.tmp");
    fs::write(
        &other,
        b"{\"cdiVersion\":\"0.6.0\",\"kind\":\"jarvice.com/rdma\",\"devices\":[]}",
    )
    .unwrap();
    fs::rename(&other, &t.spec).unwrap();
    assert!(restored(), "replaced: restored");

    // The whole directory goes (a runtime reinstall): made again, with the spec. Moved away
    // first, so that our restore cannot race the removal of its contents.
    let aside = t.host.tmp.path().join("cdi-aside");
    fs::rename(&t.dir, &aside).unwrap();
    fs::remove_dir_all(&aside).unwrap();
    assert!(restored(), "directory gone: made again with the spec");
    // And it is watched again: the next deletion is seen too.
    fs::remove_file(&t.spec).unwrap();
    assert!(
        restored(),
        "deleted after the directory came back: restored"
    );

    // Other files in the directory are none of ours.
    let theirs = t.dir.join("nvidia.com_gpu.json");
    fs::write(&theirs, b"{}").unwrap();
    assert_eq!(read(&theirs), "{}");
    // One that defines our kind too makes both unresolvable in the runtime's CDI cache:
    // diagnose says so.
    let rival = t.dir.join("zz_rival.json");
    fs::write(
        &rival,
        b"{\"cdiVersion\": \"0.6.0\", \"kind\": \"jarvice.com/rdma\", \"devices\": []}",
    )
    .unwrap();
    let out = t.diagnose(&[]);
    assert!(
        out.contains("zz_rival.json also defines jarvice.com/rdma"),
        "{}",
        out
    );
    fs::remove_file(&rival).unwrap();

    // Healthy all along: a restored spec is no reason to fail pods.
    let list = t.kubelet.wait_list(RDMA, "Healthy", |l| {
        l.devices.iter().all(|d| d.health == "Healthy")
    });
    assert!(!list.devices.is_empty());
    // Logged at warn once, the repeats at debug.
    let log = t.plugin.log_text();
    assert_eq!(log.matches("[WARN ] CDI spec").count(), 1, "{log}");
}

#[test]
fn an_unwritable_spec_makes_the_resource_unhealthy_until_it_can_be_written() {
    let t = Cdi::start("cdiunhealthy", &[]);
    let good = read(&t.spec);
    // A directory where the spec goes: rename(2) over it fails for root too. The plugin
    // restores the file as soon as it is deleted, so this may take a few tries.
    assert!(
        (0..1000).any(|_| {
            let _ = fs::remove_file(&t.spec);
            fs::create_dir(&t.spec).is_ok()
        }),
        "a directory in the spec's place"
    );
    t.kubelet.expect_health("Unhealthy");
    assert!(t.plugin.wait_log("cannot be written"));
    // No CDI name that cannot resolve; the device specs still grant the nodes.
    let c = t.allocate();
    assert!(c.cdi_devices.is_empty(), "{c:?}");
    assert_eq!(c.devices.len(), 4);
    let out = t.diagnose(&[]);
    assert!(
        out.contains("fail cdi: ") && out.contains("jarvice.com_rdma.json"),
        "{}",
        out
    );

    fs::remove_dir_all(&t.spec).unwrap();
    t.kubelet.expect_health("Healthy");
    assert!(wait_for(WAIT, || read(&t.spec) == good));
    assert!(t.plugin.wait_log("is written again"));
    let c = t.allocate();
    assert_eq!(c.cdi_devices.len(), 1);
}

#[test]
fn a_spec_dir_that_cannot_be_made_is_unhealthy_from_the_start() {
    let host = Host::new("cdinodir");
    let blocker = host.tmp.path().join("notadir");
    fs::write(&blocker, b"").unwrap();
    let dir = blocker.join("cdi").display().to_string();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(&host, &["--cdi", "--cdi-dir", &dir]);
    kubelet.expect_registered();
    let list = kubelet.expect_list();
    assert!(
        list.devices.iter().all(|d| d.health == "Unhealthy"),
        "{list:?}"
    );
    assert!(plugin.wait_log("cannot be written"));
    let resp = plugin_client(&host.socket())
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    let c = &resp.container_responses[0];
    assert!(c.cdi_devices.is_empty());
    assert_eq!(c.devices.len(), 3);
}

#[test]
fn allocate_carries_device_specs_with_the_cdi_names_unless_cdi_only() {
    let t = Cdi::start("cdiboth", &[]);
    let c = t.allocate();
    assert_eq!(c.cdi_devices[0].name, "jarvice.com/rdma=rdma-0");
    // uverbs0..2 and rdma_cm: a runtime without CDI still gives the container its devices.
    assert_eq!(spec_paths(&c).len(), 4, "{c:?}");
    let text = t.diagnose(&[]);
    assert!(
        text.contains("ok   cdi: ") && text.contains("is current: 1 device(s)"),
        "{text}"
    );
    assert!(text.contains("CDI names and device specs"), "{text}");
    drop(t);

    let t = Cdi::start("cdionly", &["--cdi-only"]);
    let c = t.allocate();
    assert_eq!(c.cdi_devices[0].name, "jarvice.com/rdma=rdma-0");
    assert!(c.devices.is_empty(), "{c:?}");
    let out = t.diagnose(&["--cdi-only"]);
    assert!(out.contains("warn cdi: jarvice.com/rdma: --cdi-only"));

    for bad in [
        &["--cdi-only"][..],
        &["--cdi-device-specs"],
        &["--cdi", "--cdi-only", "--cdi-device-specs"],
    ] {
        let out = run(&t.host, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
}

#[test]
fn a_spec_dir_deleted_on_the_host_but_still_mounted_here_ends_the_process() {
    // As in a pod: /var/run/cdi is a bind mount (hostPath) of the host's directory, which the
    // host deletes. The mount keeps the deleted directory; files made in it reach no runtime,
    // and only a new container sees the host's new one. So the plugin exits (non-zero) and
    // says why, and the kubelet restarts it with fresh mounts.
    if !mount_namespaces() {
        eprintln!("no mount namespace to be had here (or under an emulator): skipped");
        return;
    }
    let host = Host::new("cdistale");
    let _kubelet = FakeKubelet::start(&host.plugin_dir());
    let on_host = host.tmp.path().join("host-cdi");
    let in_pod = host.tmp.path().join("pod-cdi");
    fs::create_dir(&on_host).unwrap();
    fs::create_dir(&in_pod).unwrap();
    let log = host.tmp.path().join("plugin-stale.log");
    let mut args = vec![plugin_bin().display().to_string()];
    args.extend(host.args());
    args.extend([
        "--cdi".into(),
        "--cdi-dir".into(),
        in_pod.display().to_string(),
    ]);
    // Mounted, then deleted on the "host" side before the plugin starts (a pod started after
    // the host deleted the directory; tests/socket.rs has a running plugin's case).
    let script = format!(
        "mount --bind {} {} && rmdir {} && exec \"$@\"",
        on_host.display(),
        in_pod.display(),
        on_host.display()
    );
    let child = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script, "sh"])
        .args(&args)
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut plugin = Plugin { child, log };
    let status = plugin.wait_exit(WAIT).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", plugin.log_text());
    assert!(
        plugin
            .log_text()
            .contains("was deleted on the host and this container still has the old one mounted"),
        "{}",
        plugin.log_text()
    );
}
