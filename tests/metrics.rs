//! `--metrics-address` and `--events` through the real binary: scrapes over real TCP parsed by
//! a Prometheus text-format parser (`prometheus-parse`), metrics that follow ports and
//! Allocate calls, hostile scrapers (slowloris, a flood of connections, a huge request) that
//! cannot starve the plugin or grow it, and Events posted to the fake API server as client-go's
//! recorder posts them (a series for repeats).
#![cfg(feature = "metrics")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::scrape::*;
use common::*;
use prometheus_parse::Value;
use rdma_plugin::host::mock;

const FAST: [&str; 6] = [
    "--health-interval",
    "0.1",
    "--hold-down",
    "0",
    "--metrics-address",
    "127.0.0.1:0",
];

/// Per HCA and port: state, phys_state, link layer, rate, granted; per resource: devices,
/// healthy, registered, serving; health transitions as ports go down and up; Allocate counted
/// by code, timed, and its devices counted.
#[test]
fn a_scrape_follows_ports_and_allocations() {
    let host = Host::with_hcas("metrics-ports");
    let mut args = FAST.to_vec();
    args.extend(["--hcas", "mlx5_0,mlx5_1"]);
    let (kubelet, plugin) = start_registered(&host, &args);
    let addr = metrics_addr(&plugin);
    let s = scrape_until(addr, "registered", |s| {
        value(
            s,
            "jarvice_rdma_registered",
            &[("resource", "jarvice.com/rdma")],
        ) == Some(1.0)
    });
    let port = |hca| [("hca", hca), ("port", "1")];
    assert_eq!(
        value(&s, "jarvice_rdma_port_up", &port("mlx5_0")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_port_state", &port("mlx5_0")),
        Some(4.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_port_phys_state", &port("mlx5_0")),
        Some(5.0)
    );
    let info = [("hca", "mlx5_2"), ("port", "1"), ("link_layer", "Ethernet")];
    assert_eq!(value(&s, "jarvice_rdma_port_info", &info), Some(1.0));
    assert!(
        value(
            &s,
            "jarvice_rdma_port_rate_bytes_per_second",
            &port("mlx5_0")
        ) > Some(0.0)
    );
    // `--hcas`: the RoCE NIC is not granted.
    let granted = |hca| [("hca", hca), ("resource", "jarvice.com/rdma")];
    assert_eq!(
        value(&s, "jarvice_rdma_hca_granted", &granted("mlx5_0")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_hca_granted", &granted("mlx5_2")),
        Some(0.0)
    );
    let r = [("resource", "jarvice.com/rdma")];
    assert_eq!(value(&s, "jarvice_rdma_resource_devices", &r), Some(1.0));
    assert_eq!(
        value(&s, "jarvice_rdma_resource_devices_healthy", &r),
        Some(1.0)
    );
    assert_eq!(value(&s, "jarvice_rdma_serving", &r), Some(1.0));
    assert_eq!(
        value(
            &s,
            "jarvice_rdma_build_info",
            &[("frontend", "device-plugin")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_refused_device_nodes", &[]),
        Some(0.0)
    );

    // Both InfiniBand ports down: the resource turns Unhealthy, and back.
    host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
    host.set_port("mlx5_1", 1, mock::DOWN_POLLING);
    let s = scrape_until(addr, "ports down", |s| {
        value(s, "jarvice_rdma_resource_devices_healthy", &r) == Some(0.0)
    });
    assert_eq!(
        value(&s, "jarvice_rdma_port_up", &port("mlx5_0")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_port_state", &port("mlx5_0")),
        Some(1.0)
    );
    let to = |h| [("resource", "jarvice.com/rdma"), ("health", h)];
    assert_eq!(
        value(
            &s,
            "jarvice_rdma_health_transitions_total",
            &to("Unhealthy")
        ),
        Some(1.0)
    );
    host.set_port("mlx5_1", 1, mock::ACTIVE);
    scrape_until(addr, "a port back", |s| {
        value(s, "jarvice_rdma_health_transitions_total", &to("Healthy")) == Some(1.0)
    });
    kubelet.expect_health("Healthy");

    // Allocate: one granted, one refused (an ID we never advertised).
    let client = plugin_client(&host.socket());
    client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    let _ = client.allocate_opt(&alloc_request(&[&["rdma-99"]]), opt());
    let s = scrape(addr);
    let rpc = |code| [("rpc", "Allocate"), ("code", code)];
    assert_eq!(
        value(&s, "jarvice_rdma_requests_total", &rpc("OK")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_requests_total", &rpc("InvalidArgument")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_allocated_devices_total", &r),
        Some(1.0)
    );
    let count = s
        .samples
        .iter()
        .find(|x| x.metric == "jarvice_rdma_request_duration_seconds_count")
        .map(|x| x.value.clone());
    assert!(
        matches!(count, Some(Value::Untyped(n)) if n == 2.0),
        "{count:?}"
    );
}

/// No flag, no endpoint: no metrics thread and no listening socket of ours.
#[test]
fn metrics_are_off_by_default() {
    let host = Host::with_hcas("metrics-off");
    let (_kubelet, plugin) = start_registered(&host, &[]);
    let comms: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", plugin.pid()))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .collect();
    assert!(
        !comms
            .iter()
            .any(|c| c.trim() == "metrics" || c.trim() == "events"),
        "{comms:?}"
    );
    assert!(!plugin.log_text().contains("metrics on"));
}

/// Slowloris, a flood of 10,000 connections held open (2,000 under emulation), a 1 MiB request head: each bounded
/// (64 slots, 5 s per connection, 8 KiB per head); the plugin's threads do not grow, Allocate
/// keeps answering, memory stays within a few MiB, and the endpoint answers again once the
/// attackers are gone.
#[test]
fn hostile_scrapers_cannot_starve_the_plugin() {
    let host = Host::with_hcas("metrics-hostile");
    let (_kubelet, plugin) = start_registered(&host, &FAST);
    let addr = metrics_addr(&plugin);
    scrape(addr);
    let (threads, _) = threads_and_fds(plugin.pid());
    let rss = peak_rss_kib(plugin.pid());
    let client = plugin_client(&host.socket());

    // A head of 1 MiB: refused at 8 KiB.
    let mut big = TcpStream::connect(addr).unwrap();
    big.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    head.resize(1 << 20, b'a');
    let _ = big.write_all(&head);
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.is_empty(),
        "{answer:.200}"
    );

    // Slowloris: every slot taken by a head that never ends.
    let mut slow: Vec<TcpStream> = (0..server_slots())
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    // Then a flood held open: answered 503 and closed past the slots, never a thread each.
    raise_open_files();
    let start = Instant::now();
    let mut flood = Vec::new();
    // 10,000 natively; under qemu-user each connect is far slower, and 2,000 past the 64
    // slots show the same.
    let n = if under_emulation() { 2_000 } else { 10_000 };
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                flood.push(s);
                if flood.len() % 2000 == 0 {
                    eprintln!("{} in {:?}", flood.len(), start.elapsed());
                }
            }
            Err(e) => panic!("connection {} refused: {e}", flood.len()),
        }
    }
    eprintln!("{n} connections in {:?}", start.elapsed());
    // A thread per connection would be thousands; gRPC's event-engine pool may start one more
    // thread of its own when a call arrives with none waiting (the benchmark shows 9 or 10).
    let (during, _) = threads_and_fds(plugin.pid());
    assert!(
        during <= threads + 1,
        "threads {threads} -> {during} under the flood"
    );
    client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .expect("Allocate answers during the flood");
    // Every connection ends within the deadline: a 503 past the slots, or closed unanswered
    // when its slot's 5 s are up (on a slow machine the slowloris slots free up mid-flood).
    let last = flood.last_mut().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(7))).unwrap();
    let mut end = String::new();
    let read = last.read_to_string(&mut end);
    assert!(
        read.is_ok() && (end.is_empty() || end.starts_with("HTTP/1.1 503")),
        "{read:?} {end:.200}"
    );
    drop(flood);
    // The slow ones time out within 5 s of their accept; the endpoint answers again.
    let why = |w| [("why", w)];
    let rejected = "jarvice_rdma_metrics_connections_rejected_total";
    let s = scrape_until(addr, "every slow one timed out", |s| {
        value(s, rejected, &why("timeout")) >= Some(server_slots() as f64)
    });
    assert!(
        value(&s, rejected, &why("busy")) >= Some(1.0),
        "{:?}",
        s.samples
    );
    assert!(value(&s, rejected, &why("timeout")) >= Some(server_slots() as f64));
    assert_eq!(value(&s, rejected, &why("too_large")), Some(1.0));
    slow.clear();
    let grown = peak_rss_kib(plugin.pid()).saturating_sub(rss);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    let (after, _) = threads_and_fds(plugin.pid());
    assert!(after <= threads + 1, "threads {threads} -> {after}");
}

/// The server's slots (`metrics::server::MAX_CONNECTIONS`).
fn server_slots() -> usize {
    rdma_plugin::metrics::server::MAX_CONNECTIONS
}

fn raise_open_files() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit struct for the call.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max.min(65_536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

/// Requests that are not scrapes get plain HTTP answers; nothing is served but GET and HEAD.
#[test]
fn the_endpoint_answers_only_scrapes() {
    let host = Host::with_hcas("metrics-http");
    let (_kubelet, plugin) = start_registered(&host, &FAST);
    let addr = metrics_addr(&plugin);
    let cases = [
        ("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405"),
        ("GET /nope HTTP/1.1\r\n\r\n", "404"),
        ("GET / HTTP/1.1\r\n\r\n", "200"),
        ("BAD\0REQUEST\r\n\r\n", "400"),
    ];
    for (req, want) in cases {
        let (status, _) = http(addr, req);
        assert!(status.contains(want), "{req:?}: {status}");
    }
    let (status, body) = http(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        status.contains("200") && body.is_empty(),
        "{status} {body:?}"
    );
}

#[cfg(feature = "dra")]
mod events {
    use super::*;
    use common::fake_api::FakeApi;

    const NODE: &str = "node-1";

    fn events_args(api: &FakeApi) -> Vec<String> {
        vec![
            "--events".into(),
            "--node-name".into(),
            NODE.into(),
            "--kube-api".into(),
            api.url(),
            "--kube-token-file".into(),
            api.token_file().display().to_string(),
        ]
    }

    fn reasons(api: &FakeApi) -> Vec<String> {
        api.events()
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// The device plugin (`--events` needs no DRA): a port down past the hold-down is a
    /// Warning on the Node, its return a Normal; the same down again is the next of its series
    /// (`series.count` 2, patched), not a second Event; a symlinked verbs node is refused and
    /// said. Each Event is valid for kube-apiserver and found by `kubectl describe node`
    /// (regarding the Node, UID = its name, namespace `default`).
    #[test]
    fn health_changes_are_events_on_the_node() {
        let host = Host::with_hcas("events-health");
        let api = FakeApi::start(false, host.tmp.path());
        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        args.extend(events_args(&api));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_kubelet, plugin) = start_registered(&host, &args);

        host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
        let down = api
            .wait_for(WAIT, |a| {
                a.events()
                    .into_iter()
                    .find(|e| e["reason"] == "RdmaPortDown")
            })
            .unwrap_or_else(|| {
                panic!("no RdmaPortDown: {:?}\n{}", api.events(), plugin.log_text())
            });
        assert_eq!(down["type"], "Warning");
        assert_eq!(down["metadata"]["namespace"], "default");
        assert_eq!(
            down["regarding"],
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": NODE})
        );
        assert!(
            down["note"]
                .as_str()
                .unwrap()
                .starts_with("mlx5_0 port 1: DOWN (Polling)"),
            "{down}"
        );
        host.set_port("mlx5_0", 1, mock::ACTIVE);
        assert!(api
            .wait_for(WAIT, |a| reasons(a)
                .contains(&"RdmaPortUp".to_string())
                .then_some(()))
            .is_some());
        // The same again: one series.
        host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
        let series = api
            .wait_for(WAIT, |a| {
                a.events()
                    .into_iter()
                    .find(|e| e["reason"] == "RdmaPortDown" && !e["series"].is_null())
            })
            .unwrap_or_else(|| panic!("no series: {:?}", api.events()));
        assert_eq!(series["series"]["count"], 2);
        assert_eq!(
            reasons(&api)
                .iter()
                .filter(|r| *r == "RdmaPortDown")
                .count(),
            1
        );
        // One POST for the series: the repeat is a PATCH, or (a slow machine, the repeat
        // before the first write) part of that one POST, as in client-go.
        let posts = api
            .requests()
            .iter()
            .filter(|r| {
                r.method == "POST" && String::from_utf8_lossy(&r.body).contains("RdmaPortDown")
            })
            .count();
        assert_eq!(posts, 1);

        // A verbs node that is a symlink: refused and said.
        std::os::unix::fs::symlink("/dev/null", host.root().join("dev/infiniband/uverbs7"))
            .unwrap();
        let refused = api
            .wait_for(WAIT, |a| {
                a.events()
                    .into_iter()
                    .find(|e| e["reason"] == "RdmaDeviceNodeRefused")
            })
            .unwrap_or_else(|| panic!("no refusal: {:?}", api.events()));
        assert!(refused["note"].as_str().unwrap().contains("uverbs7"));
        let s = scrape(metrics_addr(&plugin));
        assert_eq!(
            value(&s, "jarvice_rdma_refused_device_nodes", &[]),
            Some(1.0)
        );
        let created = [("reason", "RdmaPortDown"), ("result", "created")];
        assert_eq!(value(&s, "jarvice_rdma_events_total", &created), Some(1.0));
        // Every write was accepted as kube-apiserver validates Events.
        for r in api.requests() {
            assert!(r.status < 300, "{} {} -> {}", r.method, r.path, r.status);
        }
    }

    /// Without RBAC for Events (403), the plugin says so once and serves on.
    #[test]
    fn events_refused_by_the_api_server_are_said_once() {
        let host = Host::with_hcas("events-forbidden");
        let api = FakeApi::start(false, host.tmp.path());
        for _ in 0..4 {
            api.fail_next("/events", common::fake_api::Fault::Status(403));
        }
        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        args.extend(events_args(&api));
        args.extend(["--hcas".to_string(), "mlx5_0,mlx5_1".to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (kubelet, plugin) = start_registered(&host, &args);
        host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
        host.set_port("mlx5_1", 1, mock::DOWN_POLLING);
        kubelet.expect_health("Unhealthy");
        assert!(plugin.wait_log("cannot post the Event"));
        host.set_port("mlx5_0", 1, mock::ACTIVE);
        kubelet.expect_health("Healthy");
        assert_eq!(
            plugin.log_text().matches("cannot post the Event").count(),
            1,
            "{}",
            plugin.log_text()
        );
    }

    /// An API server that hangs on Events never holds up the plugin: health still reaches the
    /// kubelet at once, Allocate answers, and the Event goes out once the API server answers.
    #[test]
    fn a_hanging_api_server_does_not_hold_up_health() {
        use common::fake_api::Fault;
        let host = Host::with_hcas("events-hang");
        let api = FakeApi::start(false, host.tmp.path());
        api.fail_next("/events", Fault::Hang(Duration::from_secs(30)));
        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        args.extend(events_args(&api));
        args.extend(["--hcas".to_string(), "mlx5_0,mlx5_1".to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (kubelet, plugin) = start_registered(&host, &args);
        let t0 = Instant::now();
        host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
        host.set_port("mlx5_1", 1, mock::DOWN_POLLING);
        kubelet.expect_health("Unhealthy");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        host.set_port("mlx5_0", 1, mock::ACTIVE);
        kubelet.expect_health("Healthy");
        plugin_client(&host.socket())
            .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
            .expect("Allocate while the API server hangs");
        // The hung write times out (10 s) and is tried again: the Events arrive.
        let down = api.wait_for(Duration::from_secs(60), |a| {
            a.events()
                .into_iter()
                .find(|e| e["reason"] == "RdmaPortDown")
        });
        assert!(down.is_some(), "{:?}\n{}", api.events(), plugin.log_text());
    }
}

/// The exposition as `promtool check metrics` lints it (names, units, `_total` on counters,
/// HELP on every family), after ports went down and Allocate ran, so that counters and the
/// histogram are in it. `scripts/test.sh` puts Debian's promtool in `$PROMTOOL`; a run without
/// it (the per-architecture runs under qemu, which serve the same text) says so and passes.
#[test]
fn the_exposition_passes_promtool_lint() {
    let Some(promtool) = std::env::var_os("PROMTOOL") else {
        eprintln!("PROMTOOL not set: the lint runs in scripts/test.sh");
        return;
    };
    let host = Host::with_hcas("metrics-lint");
    let (_kubelet, plugin) = start_registered(&host, &FAST);
    let addr = metrics_addr(&plugin);
    host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
    let client = plugin_client(&host.socket());
    client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .unwrap();
    scrape_until(addr, "port down", |s| {
        value(s, "jarvice_rdma_port_up", &[("hca", "mlx5_0")]) == Some(0.0)
    });
    let (_, body) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    if let Err(lint) = promtool_lint(&promtool, &body) {
        panic!("promtool check metrics:\n{lint}\n--- exposition ---\n{body}");
    }
}

/// `promtool check metrics` on `body`: its lint output when it fails.
fn promtool_lint(promtool: &std::ffi::OsStr, body: &str) -> Result<(), String> {
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Under a low open-files limit (80), scrapers get a quarter of it at most: 200 connections held
/// open leave gRPC the descriptors for a new client, and the metrics thread does not spin on a
/// listener it cannot accept from (CPU time over 2 s).
#[test]
fn scrapers_cannot_take_the_descriptors_grpc_needs() {
    let host = Host::with_hcas("metrics-nofile");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start_with(&host, &FAST, with_limit(Rlimit::Nofile, 80, 80));
    kubelet.expect_registered();
    kubelet.expect_list();
    let addr = metrics_addr(&plugin);
    let held: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ");
            s
        })
        .collect();
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", plugin.pid())).unwrap();
        let f: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu() - before;
    assert!(
        ticks < 50,
        "{ticks} clock ticks of CPU in 2 s with 200 held connections"
    );
    // A new gRPC client (a fresh channel: new descriptors) still gets an answer.
    let client = plugin_client(&host.socket());
    client
        .allocate_opt(&alloc_request(&[&["rdma-0"]]), opt())
        .expect("Allocate with scrapers holding connections");
    drop(held);
    scrape_until(addr, "answers again", |_| true);
}

/// A hostile sysfs: an HCA whose name carries a quote, a backslash, braces, `#` and a space (a
/// directory name may hold any byte but `/` and NUL) still gives an exposition that parses and
/// passes promtool's lint, its label escaped; one with a newline is left out by the sysfs
/// reader (control characters) and appears nowhere. 1,000 refused Allocates make one series,
/// not one per request (label values come from fixed sets).
#[test]
fn hostile_names_and_repeated_requests_keep_the_exposition_sound() {
    let host = Host::with_hcas("metrics-names");
    let mut odd = rdma_plugin::host::mock::MockHca::connectx(7).uverbs(7);
    odd.name = "mlx5_\"x\\{y} #z".to_string();
    host.add_hca(&odd);
    let mut newline = rdma_plugin::host::mock::MockHca::connectx(8).uverbs(8);
    newline.name = "mlx5_8\nforged_metric 1".to_string();
    host.add_hca(&newline);
    let (_kubelet, plugin) = start_registered(&host, &FAST);
    let addr = metrics_addr(&plugin);
    let client = plugin_client(&host.socket());
    for i in 0..1000 {
        let id = format!("bogus-{i}");
        let _ = client.allocate_opt(&alloc_request(&[&[id.as_str()]]), opt());
    }
    // Escaped as the text format says (`\"`, `\\`); promtool, Prometheus' own parser, reads
    // it below (prometheus-parse drops a sample whose label holds an escaped quote).
    let (_, raw) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
    let want = r#"jarvice_rdma_port_up{hca="mlx5_\"x\\{y} #z",port="1"} 1"#;
    assert!(raw.lines().any(|l| l == want), "{raw}");
    assert!(!raw.contains("forged"), "{raw}");
    let s = scrape(addr);
    let refused = [("rpc", "Allocate"), ("code", "InvalidArgument")];
    assert_eq!(
        value(&s, "jarvice_rdma_requests_total", &refused),
        Some(1000.0)
    );
    let series = s
        .samples
        .iter()
        .filter(|x| x.metric == "jarvice_rdma_requests_total")
        .count();
    assert_eq!(series, 1, "{:?}", s.samples);
    if let Some(promtool) = std::env::var_os("PROMTOOL") {
        promtool_lint(&promtool, &raw).unwrap();
    }
}

/// A kubelet restart, in each of the orders a real one can take (clean, crashed with its
/// sockets left, sockets removed one by one), is counted once however many resources register
/// again; `registered` follows the kubelet that owns `kubelet.sock`.
#[test]
fn kubelet_restarts_are_counted_once_in_any_order() {
    let host = Host::with_hcas("metrics-restarts");
    let mut args = FAST.to_vec();
    args.extend([
        "--resource",
        "jarvice.com/rdma",
        "--resource",
        "jarvice.com/ib,mode=per-hca,hcas=mlx5_0;mlx5_1",
    ]);
    let dir = host.plugin_dir();
    let mut kubelet = FakeKubelet::start(&dir);
    let plugin = Plugin::start(&host, &args);
    let addr = metrics_addr(&plugin);
    let registered = |s: &prometheus_parse::Scrape| {
        ["jarvice.com/rdma", "jarvice.com/ib"]
            .iter()
            .all(|r| value(s, "jarvice_rdma_registered", &[("resource", r)]) == Some(1.0))
    };
    scrape_until(addr, "both registered", registered);
    let quiet = Behaviour {
        clean: false,
        ..Behaviour::default()
    };
    for n in 1..=3 {
        match n {
            1 => kubelet.stop_in_place(),
            2 => kubelet.crash(),
            _ => {
                kubelet.crash();
                let _ = std::fs::remove_file(dir.join("kubelet.sock"));
                std::thread::sleep(Duration::from_millis(30));
                let _ = std::fs::remove_file(host.socket());
            }
        }
        kubelet = if n == 1 {
            FakeKubelet::start(&dir)
        } else {
            FakeKubelet::start_with(&dir, quiet.clone())
        };
        let s = scrape_until(addr, "registered again", |s| {
            registered(s) && value(s, "jarvice_rdma_kubelet_restarts_total", &[]) == Some(n as f64)
        });
        assert_eq!(
            value(&s, "jarvice_rdma_kubelet_restarts_total", &[]),
            Some(n as f64)
        );
    }
}
