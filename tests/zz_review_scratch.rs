mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn cpu_ticks(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn start_cdi(
    tag: &str,
    extra: &[&str],
) -> (
    Host,
    FakeKubelet,
    Plugin,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let host = Host::with_hcas(tag);
    let dir = host.tmp.path().join("run/cdi");
    let arg = dir.display().to_string();
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut args = vec!["--cdi", "--cdi-dir", &arg];
    args.extend(extra);
    let info = std::env::var("ZZ_INFO").is_ok();
    let plugin = Plugin::start_with(&host, &args, |c| { if info { c.env("RUST_LOG", "info"); } });
    kubelet.expect_health("Healthy");
    let spec = dir.join("jarvice.com_rdma.json");
    assert!(wait_for(WAIT, || spec.exists()));
    (host, kubelet, plugin, dir, spec)
}

#[test]
fn z1_tmp_symlink_follows_out_of_the_cdi_dir() {
    let (host, _k, _p, dir, spec) = start_cdi("zsym", &[]);
    let victim = host.tmp.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join(".jarvice.com_rdma.json.tmp")).unwrap();
    fs::remove_file(&spec).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let v = fs::read_to_string(&victim).unwrap();
    let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
    eprintln!("victim now: mode {mode:o}, {} bytes: {:.60}", v.len(), v);
    eprintln!(
        "spec is symlink: {}",
        fs::symlink_metadata(&spec)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
    );
    assert_eq!(v, "precious", "victim overwritten through the tmp symlink");
}

#[test]
fn z2_fight_cpu() {
    let (_host, _k, plugin, _dir, spec) = start_cdi("zfight", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let pid = plugin.pid();
    let me0 = cpu_ticks(std::process::id() as i32);
    let c0 = cpu_ticks(pid);
    let end = Instant::now() + Duration::from_secs(3);
    let mut n = 0u64;
    while Instant::now() < end {
        fs::write(&spec, format!("{{\"x\":{n}}}")).unwrap();
        n += 1;
        std::thread::sleep(Duration::from_micros(500));
    }
    let c1 = cpu_ticks(pid);
    let me1 = cpu_ticks(std::process::id() as i32);
    let log = plugin.log_text();
    eprintln!(
        "writer wrote {n} times; plugin cpu {} ticks in 3 s; test process {} ticks; restores logged {}; deferred lines {}",
        c1 - c0,
        me1 - me0,
        log.matches("by someone else: restored").count(),
        log.matches("differs again").count()
    );
}

#[test]
fn z3_plugin_dir_parent_moved_and_made_again() {
    let host = Host::new("zparent");
    let base = host.tmp.path().join("kubelet");
    let pdir = base.join("plugins");
    fs::create_dir_all(&pdir).unwrap();
    let kubelet = FakeKubelet::start(&pdir);
    let log = host.tmp.path().join("p.log");
    let mut child = plugin_command()
        .args([
            "--plugin-dir",
            &pdir.display().to_string(),
            "--host-root",
            &host.root().display().to_string(),
            "--sysfs",
            &host.sys().display().to_string(),
            "--poll-interval",
            "3600",
        ])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    kubelet.expect_registered();
    kubelet.stop();
    assert!(wait_for(WAIT, || fs::read_to_string(&log)
        .unwrap()
        .contains("nothing to serve: gRPC")));
    fs::rename(&base, host.tmp.path().join("kubelet.old")).unwrap();
    fs::create_dir_all(&pdir).unwrap();
    let kubelet = FakeKubelet::start(&pdir);
    let got = kubelet.next_within(Duration::from_secs(8)).is_some();
    let _ = child.kill();
    let _ = child.wait();
    let text = fs::read_to_string(&log).unwrap();
    eprintln!(
        "{}",
        text.lines().rev().take(8).collect::<Vec<_>>().join("\n")
    );
    assert!(
        got,
        "no Register within 8 s of a new kubelet in the re-made plugin dir"
    );
}

#[test]
fn z4_chmod_of_our_socket_is_a_restart() {
    let host = Host::new("zchmod");
    let (kubelet, plugin) = start_registered(&host, &[]);
    std::thread::sleep(Duration::from_millis(300));
    while kubelet.next_within(Duration::from_millis(200)).is_some() {}
    fs::set_permissions(host.socket(), fs::Permissions::from_mode(0o600)).unwrap();
    let again = kubelet.next_within(Duration::from_secs(5));
    eprintln!("after chmod: {:?}", again.is_some());
    let log = plugin.log_text();
    eprintln!(
        "restart lines: {}",
        log.matches("our socket was removed").count()
    );
    assert!(again.is_none(), "a chmod made us restart and re-register");
}

#[test]
fn z5_failed_write_forgets_our_spec_and_leaves_it_at_exit() {
    let (host, _k, mut plugin, dir, spec) = start_cdi("zleft", &[]);
    fs::create_dir(dir.join(".jarvice.com_rdma.json.tmp")).unwrap();
    // The spec must change: a node goes.
    fs::remove_file(host.root().join("dev/infiniband/uverbs2")).unwrap();
    assert!(plugin.wait_log("cannot be written"));
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait_exit(WAIT).unwrap().success());
    assert!(
        !spec.exists(),
        "our (stale) spec left behind at exit: {}",
        fs::read_to_string(&spec).unwrap_or_default().len()
    );
    let _ = Path::new("/");
}

fn st(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(p) {
        Ok(m) => format!(
            "ino {} ctime {}.{:09} nlink {} mode {:o}",
            m.ino(),
            m.ctime(),
            m.ctime_nsec(),
            m.nlink(),
            m.mode()
        ),
        Err(e) => format!("{e}"),
    }
}

#[test]
fn z6_socket_identity_at_exit() {
    for cdi in [false, true] {
        let host = Host::with_hcas(if cdi { "z6c" } else { "z6n" });
        let dir = host.tmp.path().join("run/cdi").display().to_string();
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        let args: Vec<&str> = if cdi {
            vec!["--cdi", "--cdi-dir", &dir]
        } else {
            vec![]
        };
        let mut plugin = Plugin::start(&host, &args);
        kubelet.expect_registered();
        for i in 0..5 {
            eprintln!("cdi={cdi} t{i}: {}", st(&host.socket()));
            std::thread::sleep(Duration::from_millis(200));
        }
        plugin.signal(libc::SIGTERM);
        plugin.wait_exit(WAIT).unwrap();
        eprintln!(
            "cdi={cdi} after exit: {} ; log says left alone: {}",
            st(&host.socket()),
            plugin.log_text().contains("no longer our socket")
        );
    }
}

#[test]
fn z7_alternating_failure_is_not_paced() {
    std::env::set_var("ZZ_INFO", "1");
    let (_host, kubelet, plugin, _dir, spec) = start_cdi("zflap", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let c0 = cpu_ticks(plugin.pid());
    let end = Instant::now() + Duration::from_secs(3);
    let mut toggles = 0;
    while Instant::now() < end {
        let _ = fs::remove_file(&spec);
        if fs::create_dir(&spec).is_ok() {
            toggles += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
        let _ = fs::remove_dir(&spec);
        std::thread::sleep(Duration::from_millis(5));
    }
    let c1 = cpu_ticks(plugin.pid());
    let log = plugin.log_text();
    let mut lists = 0;
    while kubelet.next_within(Duration::from_millis(50)).is_some() { lists += 1; }
    eprintln!(
        "toggles {toggles}; WARN cannot be written: {}; INFO written again: {}; restores logged: {}; kubelet events: {lists}; cpu {}",
        log.matches("[WARN ] CDI spec").count() - log.matches("by someone else").count(),
        log.matches("is written again").count(),
        log.matches("by someone else").count(),
        c1 - c0
    );
}
