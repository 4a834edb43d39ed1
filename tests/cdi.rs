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
struct Cdi {
    host: Host,
    kubelet: FakeKubelet,
    plugin: Plugin,
    dir: PathBuf,
    spec: PathBuf,
}

impl Cdi {
    fn start(tag: &str, extra: &[&str]) -> Cdi {
        let host = Host::with_hcas(tag);
        let dir = host.tmp.path().join("run/cdi");
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
    let out = run(
        &t.host,
        &[
            "diagnose",
            "--cdi",
            "--cdi-dir",
            &t.dir.display().to_string(),
        ],
    );
    assert!(
        stdout(&out).contains("fail cdi: ") && stdout(&out).contains("jarvice.com_rdma.json"),
        "{}",
        stdout(&out)
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
    let out = run(
        &t.host,
        &[
            "diagnose",
            "--cdi",
            "--cdi-dir",
            &t.dir.display().to_string(),
        ],
    );
    let text = stdout(&out);
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
    let out = run(
        &t.host,
        &[
            "diagnose",
            "--cdi",
            "--cdi-only",
            "--cdi-dir",
            &t.dir.display().to_string(),
        ],
    );
    assert!(stdout(&out).contains("warn cdi: jarvice.com/rdma: --cdi-only"));

    for bad in [
        &["--cdi-only"][..],
        &["--cdi-device-specs"],
        &["--cdi", "--cdi-only", "--cdi-device-specs"],
    ] {
        let out = run(&t.host, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
}
