//! `jarvice-rdma-plugin diagnose`: what an operator runs when RDMA pods fail
//! (`kubectl exec ds/rdma-device -- /jarvice-rdma-plugin diagnose`). One line per check, `ok`,
//! `warn` or `fail`, each warning and failure with its fix; exit status 0 when nothing fails.
//!
//! Run in the plugin's own container it sees what RDMA pods on that node get: the runtime's
//! default locked-memory limit, the RDMA netns mode, the host's `/dev` and the kubelet's dir.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

use crate::config::Config;
use crate::host::health::{Mode, PortMonitor};
use crate::host::nodes::INFINIBAND_DIR;
use crate::host::sysfs::{self, DevNum};
use crate::host::{self, Assessment, Host};
use crate::limits::{self, Memlock};
use crate::resource::cdi;
use crate::sys;
use crate::tools::json::quote;
use crate::tools::probe;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn ok(name: &'static str, message: String) -> Check {
        Check {
            name,
            status: Status::Ok,
            message,
            fix: None,
        }
    }
    pub(crate) fn bad(name: &'static str, status: Status, message: String, fix: &str) -> Check {
        Check {
            name,
            status,
            message,
            fix: Some(fix.to_string()),
        }
    }
}

/// The locked-memory limit this process has, which is what the runtime gives every container.
fn memlock() -> Check {
    let m = limits::memlock();
    let status = match m {
        Memlock::Unlimited => return Check::ok("memlock", m.message()),
        Memlock::TooLow(_) => Status::Fail,
        Memlock::Limited(_) | Memlock::Unknown(_) => Status::Warn,
    };
    Check::bad("memlock", status, m.message(), limits::MEMLOCK_FIX)
}

fn netns(sysfs_root: &Path) -> Check {
    match sysfs::netns_shared(sysfs_root) {
        Some(true) => Check::ok(
            "rdma netns",
            "shared: every pod sees every HCA in /sys/class/infiniband".into(),
        ),
        Some(false) => Check::bad(
            "rdma netns",
            Status::Warn,
            "exclusive: a pod sees only the HCAs moved into its network namespace".into(),
            "run the plugin with hostNetwork: true (or --sysfs on a host /sys mount) so it sees every HCA; \
             pods need their HCA moved into their netns (`rdma dev set <hca> netns <ns>`), e.g. by an RDMA CNI",
        ),
        None => Check::bad(
            "rdma netns",
            Status::Warn,
            format!(
                "cannot read {}: ib_core not loaded?",
                sysfs_root.join(sysfs::NETNS_MODE).display()
            ),
            "load the RDMA drivers (modprobe ib_core ib_uverbs mlx5_ib) or point --sysfs at sysfs",
        ),
    }
}

/// Every HCA's `uverbs` node must exist under the host root, as the character device sysfs
/// names.
fn nodes(cfg: &Config, h: &Host, granted: &[String]) -> Vec<Check> {
    let mut out = Vec::new();
    // A node sysfs attributes to an HCA it does not list: a partial sysfs, or a driver half
    // unloaded. Never granted with a selection, so say so.
    for e in &h.hcas.orphans {
        out.push(Check::bad(
            "device nodes",
            Status::Warn,
            format!(
                "sysfs names {} for HCA {}, which {} does not list",
                e.name,
                e.hca.as_deref().unwrap_or("?"),
                sysfs::CLASS_INFINIBAND
            ),
            "reload the RDMA drivers; with a selection flag this node is never granted",
        ));
    }
    for hca in &h.hcas.list {
        // A node missing for an HCA the operator left out is not this resource's problem.
        let severity = if granted.contains(&hca.name) {
            Status::Fail
        } else {
            Status::Warn
        };
        for e in &hca.verbs {
            let path = cfg.host_root.join(INFINIBAND_DIR).join(&e.name);
            match std::fs::metadata(&path) {
                Err(err) => out.push(Check::bad(
                    "device nodes",
                    severity,
                    format!(
                        "{}: sysfs lists {} but {} is missing ({err})",
                        hca.name,
                        e.name,
                        path.display()
                    ),
                    "mount the host's /dev (not /dev/infiniband, which goes stale when drivers reload) \
                     and check the udev rules of rdma-core; restart the plugin pod",
                )),
                Ok(m) if m.file_type().is_char_device() => {
                    let have = DevNum {
                        major: libc::major(m.rdev()),
                        minor: libc::minor(m.rdev()),
                    };
                    match e.dev {
                        Some(want) if want != have => out.push(Check::bad(
                            "device nodes",
                            severity,
                            format!(
                                "{}: {} is {have}, sysfs says {want}",
                                hca.name,
                                path.display()
                            ),
                            "the node is stale or was replaced: recreate /dev/infiniband (reload the drivers, or `udevadm trigger`)",
                        )),
                        _ => out.push(Check::ok(
                            "device nodes",
                            format!("{}: {} ({have})", hca.name, path.display()),
                        )),
                    }
                }
                Ok(_) => out.push(Check::ok(
                    "device nodes",
                    format!("{}: {} (a plain file: a test tree)", hca.name, path.display()),
                )),
            }
        }
        if hca.verbs.is_empty() {
            out.push(Check::bad(
                "device nodes",
                Status::Warn,
                format!("{}: sysfs lists no uverbs node for it", hca.name),
                "load ib_uverbs (modprobe ib_uverbs)",
            ));
        }
    }
    out
}

fn port_fix(state: &str) -> &'static str {
    if state.starts_with("INIT") || state.starts_with("ARMED") {
        "the link is up but no subnet manager configured the port: start opensm or check the fabric's SM"
    } else {
        "check the cable, the switch port and `ibstat`; a port the switch disabled needs the switch's admin"
    }
}

fn ports(h: &Host, granted: &[String]) -> Vec<Check> {
    let mut out = Vec::new();
    for hca in &h.hcas.list {
        let any_up = hca.ports.iter().any(|p| p.is_up());
        for p in &hca.ports {
            let name = format!("{} port {}", hca.name, p.number);
            let link = p.link_layer.as_ref().map_or("?", |l| l.as_str());
            if p.is_up() {
                out.push(Check::ok(
                    "ports",
                    format!("{name}: {} {link}", p.describe()),
                ));
            } else if any_up && p.is_unplugged() {
                // One reading cannot tell an uncabled spare port from a cable that was lost.
                out.push(Check {
                    name: "ports",
                    status: if granted.contains(&hca.name) {
                        Status::Warn
                    } else {
                        Status::Ok
                    },
                    message: format!(
                        "{name}: {} (another port is up; no cable or no peer: fine if this port is unused)",
                        p.describe()
                    ),
                    fix: granted.contains(&hca.name).then(|| {
                        "if this port should be up, check its cable and switch port".to_string()
                    }),
                });
            } else {
                let status = if granted.contains(&hca.name) {
                    Status::Warn
                } else {
                    Status::Ok
                };
                let mut msg = format!("{name}: {} {link}", p.describe());
                if status == Status::Ok {
                    msg.push_str(" (not granted)");
                }
                let state = p.state.as_ref().map_or("", |s| s.text.as_str());
                out.push(Check {
                    name: "ports",
                    status,
                    message: msg,
                    fix: (status != Status::Ok).then(|| port_fix(state).to_string()),
                });
            }
        }
    }
    out
}

fn kubelet(cfg: &Config) -> Check {
    let k = cfg.kubelet_socket();
    if k.exists() {
        Check::ok("kubelet", format!("{} exists", k.display()))
    } else {
        Check::bad(
            "kubelet",
            Status::Fail,
            format!("{} does not exist", k.display()),
            "the kubelet is not running, or its device-plugin dir differs: set --plugin-dir (and mount that dir)",
        )
    }
}

fn plugin(cfg: &Config) -> Check {
    match probe::probe(&cfg.socket_path()) {
        Ok(seen) => {
            let healthy = seen
                .list
                .devices
                .iter()
                .filter(|d| d.health == crate::resource::HEALTHY)
                .count();
            Check::ok(
                "plugin",
                format!(
                    "{} answers: {} device(s), {healthy} Healthy",
                    cfg.socket_path().display(),
                    seen.list.devices.len()
                ),
            )
        }
        Err(e) => Check::bad(
            "plugin",
            Status::Fail,
            e.to_string(),
            if cfg.kubelet_socket().exists() {
                "is the plugin running? see `kubectl -n kube-system logs ds/rdma-device`; flags that move the socket must be given here too"
            } else {
                "the plugin serves only while kubelet.sock exists: see the kubelet check"
            },
        ),
    }
}

/// With `--cdi`: the spec dir writable, the spec present and what this host gives now, and
/// what the container runtime must do with the names (which no file here can tell).
fn cdi(u: &Config, a: &Assessment) -> Vec<Check> {
    let mut out = Vec::new();
    let dir = &u.cdi_dir;
    out.push(match fs::metadata(dir) {
        Ok(m) if m.is_dir() && sys::may_write(dir) => {
            Check::ok("cdi", format!("{} is a writable directory", dir.display()))
        }
        Ok(m) if m.is_dir() => Check::bad(
            "cdi",
            Status::Fail,
            format!("{} is not writable here", dir.display()),
            "mount the host's /var/run/cdi read-write into the plugin (hostPath, DirectoryOrCreate); a read-only root file system needs that mount",
        ),
        Ok(_) => Check::bad(
            "cdi",
            Status::Fail,
            format!("{} is not a directory", dir.display()),
            "remove what is there; the plugin makes the directory",
        ),
        Err(e) => Check::bad(
            "cdi",
            Status::Warn,
            format!("{}: {e}", dir.display()),
            "the plugin makes it when it writes its spec; in a pod, mount the host's /var/run/cdi (hostPath, DirectoryOrCreate)",
        ),
    });
    let path = cdi::spec_path(dir, &u.resource_name);
    let devices = u.resource().cdi_devices(&a.host, &a.grant);
    let want = cdi::render(&u.resource_name, &devices);
    // Bounded and without following links: the spec dir is one others write to.
    out.push(match cdi::read_bounded(&path, 4 * want.len() as u64 + 4096) {
        Ok(text) if text == want.as_bytes() => Check::ok(
            "cdi",
            format!(
                "{} is current: {} device(s) of {}",
                path.display(),
                devices.len(),
                u.resource_name
            ),
        ),
        Ok(_) => Check::bad(
            "cdi",
            Status::Warn,
            format!("{} differs from what this host gives now", path.display()),
            "the plugin rewrites it within milliseconds while it serves: run diagnose with the plugin's own flags; if it stays so, see the plugin's log",
        ),
        Err(e) => Check::bad(
            "cdi",
            Status::Fail,
            format!("{}: {e}", path.display()),
            "the plugin writes it while it serves (with --cdi) and restores it when it goes: is the plugin running? Pods given its CDI names fail with `unresolvable CDI devices` until it is there",
        ),
    });
    for other in rivals(dir, &path, &u.resource_name) {
        out.push(Check::bad(
            "cdi",
            Status::Warn,
            format!("{} also defines {}", other.display(), u.resource_name),
            "remove it: the runtime's CDI cache drops a device name two specs define, and pods given it fail to start",
        ));
    }
    out.push(if u.cdi_only {
        Check::bad(
            "cdi",
            Status::Warn,
            format!("{}: --cdi-only: Allocate answers with CDI names alone", u.resource_name),
            "a runtime without CDI (containerd 1.6; 1.7 without enable_cdi = true) ignores them and starts pods without /dev/infiniband: check `crictl info | grep -i cdi` on the node (enableCDI true), or drop --cdi-only",
        )
    } else {
        Check::ok(
            "cdi",
            format!(
                "{}: Allocate answers with CDI names and device specs: pods get the devices with or without CDI in the runtime (`crictl info | grep -i cdi` shows which)",
                u.resource_name
            ),
        )
    });
    out
}

/// The other specs in `dir` that declare `kind` (JSON or YAML, read bounded).
fn rivals(dir: &Path, ours: &Path, kind: &str) -> Vec<std::path::PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let json = format!("\"kind\":\"{kind}\"");
    let declares = |text: &str| {
        let flat: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        flat.contains(&json)
            || text.lines().any(|l| {
                l.trim_start()
                    .strip_prefix("kind:")
                    .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\''))
                    == Some(kind)
            })
    };
    let mut out: Vec<std::path::PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p != ours)
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "json" || x == "yaml" || x == "yml")
        })
        .filter(|p| {
            cdi::read_bounded(p, 1 << 20).is_ok_and(|t| declares(&String::from_utf8_lossy(&t)))
        })
        .collect();
    out.sort();
    out
}

/// Runs every check.
pub fn run(cfg: &Config) -> Vec<Check> {
    let mut checks = vec![memlock(), netns(&cfg.sysfs)];
    let h = match host::scan(&cfg.host_root, &cfg.sysfs, cfg.selection()) {
        Ok(h) => h,
        Err(e) => {
            checks.push(Check::bad(
                "device nodes",
                Status::Fail,
                e.to_string(),
                "mount the host's /dev at <host-root>/dev readable by the plugin",
            ));
            Host {
                hcas: sysfs::read(&cfg.sysfs),
                ..Host::default()
            }
        }
    };
    if h.hcas.list.is_empty() {
        checks.push(Check::bad(
            "hcas",
            Status::Warn,
            format!(
                "{} lists no HCA: health and grants come from device nodes alone",
                cfg.sysfs.join(sysfs::CLASS_INFINIBAND).display()
            ),
            "load the RDMA drivers; in exclusive netns mode run the plugin with hostNetwork: true",
        ));
    } else {
        let names: Vec<&str> = h.hcas.list.iter().map(|x| x.name.as_str()).collect();
        checks.push(Check::ok(
            "hcas",
            format!("{} HCA(s): {}", names.len(), names.join(", ")),
        ));
    }
    // Each resource (one without --resource) assesses the same reading its own way.
    let now = Instant::now();
    let shared = std::sync::Arc::new(h.clone());
    let assessed: Vec<(Config, Assessment)> = cfg
        .units()
        .into_iter()
        .map(|u| {
            let mut monitor = PortMonitor::new(u.hold_down);
            let a = host::assess(
                std::sync::Arc::clone(&shared),
                &u.selector,
                &u.taken,
                u.health,
                &mut monitor,
                now,
            );
            (u, a)
        })
        .collect();
    let mut granted: Vec<String> = Vec::new();
    for (_, a) in &assessed {
        for name in &a.grant.hcas {
            if !granted.contains(name) {
                granted.push(name.clone());
            }
        }
    }
    checks.extend(nodes(cfg, &h, &granted));
    for x in &h.nodes.refused {
        checks.push(Check::bad(
            "device nodes",
            Status::Fail,
            format!("{} refused: {}", x.host_path, x.why),
            "device nodes must be the character devices sysfs names (or plain files in a test tree); \
             remove what is there and reload the drivers or `udevadm trigger`",
        ));
    }
    for (u, a) in &assessed {
        checks.push(match &a.grant.problem {
            Some(p) => Check::bad(
                "selection",
                Status::Fail,
                format!("{}: {p}", u.resource_name),
                "fix the selection (--hcas/--link-layer/--pci-ids/--pci-addrs or the spec's keys; `list` shows every HCA and why it is or is not granted)",
            ),
            None => Check::ok(
                "selection",
                format!(
                    "{}: {}: {} of {} HCA(s) granted",
                    u.resource_name,
                    u.selector.describe(),
                    a.grant.hcas.len(),
                    a.host.hcas.list.len()
                ),
            ),
        });
    }
    checks.extend(ports(&h, &granted));
    for (u, a) in &assessed {
        let health = &a.health;
        checks.push(if health.healthy {
            Check::ok(
                "health",
                format!(
                    "{} is Healthy: {} (rule {})",
                    u.resource_name, health.reason, health.mode
                ),
            )
        } else {
            Check::bad(
                "health",
                Status::Fail,
                format!(
                    "{} is Unhealthy: {} (rule {})",
                    u.resource_name, health.reason, health.mode
                ),
                if health.mode == Mode::Ports {
                    "bring a port of a granted HCA to ACTIVE/LinkUp (see the ports checks), or use --health nodes"
                } else {
                    "load the RDMA drivers so /dev/infiniband/uverbs* exists"
                },
            )
        });
    }
    if cfg.cdi {
        for (u, a) in &assessed {
            checks.extend(cdi(u, a));
        }
    }
    #[cfg(feature = "dra")]
    if cfg.frontend == crate::config::Frontend::Dra {
        checks.extend(crate::dra::diagnose::checks(cfg));
        return checks;
    }
    checks.push(kubelet(cfg));
    for (u, _) in &assessed {
        checks.push(plugin(u));
    }
    checks
}

/// True when no check failed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.status != Status::Fail)
}

/// `ok   memlock: unlimited ...`, with `     fix: ...` under warnings and failures.
pub fn as_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let _ = writeln!(out, "{:<4} {}: {}", c.status.word(), c.name, c.message);
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "     fix: {fix}");
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    let _ = writeln!(
        out,
        "{} check(s): {failed} failed, {warned} warning(s)",
        checks.len()
    );
    out
}

pub fn as_json(checks: &[Check]) -> String {
    let items: Vec<String> = checks
        .iter()
        .map(|c| {
            format!(
                "{{\"check\":{},\"status\":{},\"message\":{},\"fix\":{}}}",
                quote(c.name),
                quote(c.status.word()),
                quote(&c.message),
                c.fix.as_deref().map_or("null".to_string(), quote)
            )
        })
        .collect();
    format!(
        "{{\"passed\":{},\"checks\":[{}]}}\n",
        passed(checks),
        items.join(",")
    )
}
