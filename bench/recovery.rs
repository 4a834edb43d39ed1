//! How fast what others undo is put back: a deleted CDI spec restored, and a plugin dir made
//! again (a kubelet reinstall) registered with.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::{ms, summary, Row};

/// Deletion of the spec -> the same spec on disk again, 20 times, more than a second apart (a
/// restore within a second of the last is paced on purpose; that is not what this measures).
pub fn spec_restored(rows: &mut Vec<Row>) {
    let host = Host::with_hcas("bench-cdi");
    let dir = host.tmp.path().join("cdi");
    let arg = dir.display().to_string();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start_with(&host, &["--cdi", "--cdi-dir", &arg], |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    kubelet.expect_registered();
    let spec = dir.join("jarvice.com_rdma.json");
    assert!(wait_for(WAIT, || spec.exists()));
    let good = fs::read(&spec).unwrap();
    let mut samples = Vec::new();
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(1100));
        fs::remove_file(&spec).unwrap();
        let t0 = Instant::now();
        while fs::read(&spec).ok().as_deref() != Some(good.as_slice()) {
            assert!(t0.elapsed() < WAIT, "spec not restored");
            thread::sleep(Duration::from_micros(100));
        }
        samples.push(ms(t0.elapsed()));
    }
    rows.push(Row {
        what: "CDI spec deleted -> restored (after a 50 ms grace for an rm -rf of the directory)"
            .into(),
        value: summary(samples),
        target: "milliseconds past the grace",
    });
}

/// The plugin dir removed and made again, then a kubelet in it -> our Register, 10 times,
/// measured from the directory's creation. Each time only once the plugin rests with nothing
/// left to wake it (gRPC shut down, 5 s after the kubelet went): the case that waited for a
/// poll before.
pub fn plugin_dir_recreated(rows: &mut Vec<Row>) {
    let host = Host::new("bench-dir");
    let mut kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start_with(&host, &[], |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    kubelet.expect_registered();
    let aside = host.tmp.path().join("plugins-old");
    let mut samples = Vec::new();
    for i in 0..10 {
        kubelet.stop();
        fs::rename(host.plugin_dir(), &aside).unwrap();
        fs::remove_dir_all(&aside).unwrap();
        assert!(wait_for(WAIT, || plugin
            .log_text()
            .matches("nothing to serve: gRPC")
            .count()
            > i));
        let t0 = Instant::now();
        fs::create_dir(host.plugin_dir()).unwrap();
        kubelet = FakeKubelet::start(&host.plugin_dir());
        let at = kubelet.expect("Register", |ev| match ev {
            Event::Registered { .. } => Some(Instant::now()),
            _ => None,
        });
        samples.push(ms(at - t0));
    }
    rows.push(Row {
        what: "plugin dir made again -> registered (kubelet.sock made right after the dir)".into(),
        value: summary(samples),
        target: "milliseconds (was a 5 s poll)",
    });
}
