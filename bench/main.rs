//! Benchmark: the real plugin binary against our fake kubelet, over real unix sockets.
//! Run with `scripts/bench.sh`; prints a Markdown table (the README carries the latest).
//! Figures are measured, never asserted: targets are listed beside them for reading.

#[path = "../tests/common/mod.rs"]
mod common;
#[cfg(feature = "dra")]
mod dra;
#[cfg(feature = "metrics")]
mod metrics;
mod recovery;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rdma_plugin::host::mock::{self, MockHca, MockPort};
use rdma_plugin::host::nodes::{self, Selection};
use rdma_plugin::host::{self as hostmodel, health, select::Selector};

struct Row {
    what: String,
    value: String,
    target: &'static str,
}

/// The plugin at its production log level: debug lines would cost time being written.
fn start_plugin(host: &Host) -> Plugin {
    Plugin::start_with(host, &[], |cmd| {
        cmd.env("RUST_LOG", "info");
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50, p99 and max of `samples` (ms), as text.
fn summary(mut samples: Vec<f64>) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
        pick(0.50),
        pick(0.99),
        pick(1.0),
        samples.len()
    )
}

/// Time from `t0` until the kubelet sees a Register, and until its first list after that.
fn until_registered_and_listed(kubelet: &FakeKubelet, t0: Instant) -> (f64, f64) {
    let reg = kubelet.expect("Register", |ev| match ev {
        Event::Registered { .. } => Some(Instant::now()),
        _ => None,
    });
    let list = kubelet.expect("first list", |ev| match ev {
        Event::List(_) => Some(Instant::now()),
        _ => None,
    });
    (ms(reg - t0), ms(list - t0))
}

fn start_to_registered(rows: &mut Vec<Row>) {
    let mut kubelet_first = Vec::new();
    let mut plugin_first = Vec::new();
    for _ in 0..20 {
        let host = Host::new("bench-start");
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        let t0 = Instant::now();
        let plugin = start_plugin(&host);
        kubelet_first.push(until_registered_and_listed(&kubelet, t0).0);
        drop(plugin);

        let host = Host::new("bench-start2");
        let plugin = start_plugin(&host);
        // Resting: no server, no gRPC, until kubelet.sock appears.
        assert!(plugin.wait_log("is the kubelet running?"));
        let t0 = Instant::now();
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        plugin_first.push(until_registered_and_listed(&kubelet, t0).0);
        drop(plugin);
    }
    rows.push(Row {
        what: "start -> registered, kubelet first (process spawn included)".into(),
        value: summary(kubelet_first),
        target: "",
    });
    rows.push(Row {
        what: "kubelet appears -> registered, plugin first (gRPC started then)".into(),
        value: summary(plugin_first),
        target: "",
    });
}

fn hot_plug(rows: &mut Vec<Row>) {
    let host = Host::empty("bench-hotplug");
    host.add_node("uverbs0");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = start_plugin(&host);
    kubelet.expect_registered();
    kubelet.expect_list();
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for i in 0..100 {
        let name = format!("uverbs{}", i + 1);
        let t0 = Instant::now();
        host.add_node(&name);
        kubelet.expect_list();
        added.push(ms(t0.elapsed()));
        let t0 = Instant::now();
        host.remove_node(&name);
        kubelet.expect_list();
        removed.push(ms(t0.elapsed()));
    }
    rows.push(Row {
        what: "device node added -> new list at the kubelet".into(),
        value: summary(added),
        target: "p99 < 10 ms",
    });
    rows.push(Row {
        what: "device node removed -> new list at the kubelet".into(),
        value: summary(removed),
        target: "p99 < 10 ms",
    });
}

fn kubelet_restarts(rows: &mut Vec<Row>) {
    let host = Host::new("bench-restart");
    let mut kubelets = vec![FakeKubelet::start(&host.plugin_dir())];
    let _plugin = start_plugin(&host);
    kubelets[0].expect_registered();
    kubelets[0].expect_list();
    let mut registered = Vec::new();
    let mut listed = Vec::new();
    for i in 0..100 {
        // As the kubelet does it: the old one goes (every other one dies, leaving its socket),
        // the new one deletes every socket in the dir and binds a new kubelet.sock.
        let old = kubelets.last_mut().unwrap();
        if i % 2 == 0 {
            old.stop_in_place();
        } else {
            old.crash();
        }
        let t0 = Instant::now();
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        let (r, l) = until_registered_and_listed(&kubelet, t0);
        registered.push(r);
        listed.push(l);
        kubelets.push(kubelet);
    }
    // Anything the stream ends and re-checks might still bring.
    thread::sleep(Duration::from_secs(3));
    let extra: usize = kubelets.iter().map(FakeKubelet::registrations).sum();
    rows.push(Row {
        what: "kubelet restart -> registered again".into(),
        value: summary(registered),
        target: "< 50 ms in all 100",
    });
    rows.push(Row {
        what: "kubelet restart -> first list".into(),
        value: summary(listed),
        target: "",
    });
    rows.push(Row {
        what: "Register calls the kubelets got for 100 restarts (plus the first)".into(),
        value: format!("{}", 101 + extra),
        target: "101",
    });
}

/// SIGTERM with a kubelet connected -> process gone, worst of 20.
fn sigterm_exit(rows: &mut Vec<Row>) {
    let mut samples = Vec::new();
    for _ in 0..20 {
        let host = Host::new("bench-term");
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        let mut plugin = start_plugin(&host);
        kubelet.expect_registered();
        kubelet.expect_list();
        let t0 = Instant::now();
        plugin.signal(libc::SIGTERM);
        let status = plugin.wait_exit(WAIT).expect("exit");
        assert!(status.success(), "{status}");
        samples.push(ms(t0.elapsed()));
    }
    rows.push(Row {
        what: "SIGTERM with the kubelet's stream open -> exited 0".into(),
        value: summary(samples),
        target: "a few seconds at worst",
    });
}

/// The largest answer a request may get (128 containers x 128 nodes = 16,384 specs): the
/// plugin's peak RSS after it.
fn largest_answer(rows: &mut Vec<Row>) {
    let host = Host::empty("bench-largest");
    for i in 0..128 {
        host.add_node(&format!("uverbs{i}"));
    }
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = start_plugin(&host);
    kubelet.expect_registered();
    let client = plugin_client(&host.socket());
    let containers: Vec<&[&str]> = (0..128).map(|_| &["rdma-0"][..]).collect();
    let before = peak_rss_kib(plugin.pid());
    let t0 = Instant::now();
    for _ in 0..10 {
        client
            .allocate_opt(&alloc_request(&containers), opt())
            .unwrap();
    }
    let took = ms(t0.elapsed()) / 10.0;
    let after = peak_rss_kib(plugin.pid());
    rows.push(Row {
        what: "largest Allocate accepted (128 containers x 128 nodes = 16,384 specs, ~1.6 MB): peak RSS before -> after 10".into(),
        value: format!(
            "{:.1} MiB -> {:.1} MiB; {took:.1} ms per call",
            before as f64 / 1024.0,
            after as f64 / 1024.0
        ),
        target: "< 64 MiB (DaemonSet limit)",
    });
}

fn allocate_latency(rows: &mut Vec<Row>) {
    let host = Host::new("bench-alloc");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = start_plugin(&host);
    kubelet.expect_registered();
    for clients in [1usize, 8] {
        let calls_each = 4000 / clients;
        let socket = Arc::new(host.socket());
        let t0 = Instant::now();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let socket = Arc::clone(&socket);
                thread::spawn(move || {
                    let client = plugin_client(&socket);
                    let req = alloc_request(&[&["rdma-0"]]);
                    let mut lat = Vec::with_capacity(calls_each);
                    for _ in 0..calls_each {
                        let t = Instant::now();
                        let resp = client.allocate_opt(&req, opt()).expect("Allocate");
                        lat.push(ms(t.elapsed()));
                        assert_eq!(resp.container_responses[0].devices.len(), 3);
                    }
                    lat
                })
            })
            .collect();
        let lat: Vec<f64> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let rate = lat.len() as f64 / t0.elapsed().as_secs_f64();
        rows.push(Row {
            what: format!("Allocate, {clients} concurrent client(s)"),
            value: format!("{}; {rate:.0} calls/s", summary(lat)),
            target: "",
        });
    }
}

fn discovery_time(rows: &mut Vec<Row>) {
    let tmp = TempDir::new("bench-disc");
    let dir = tmp.path().join("dev/infiniband");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..1024 {
        fs::write(dir.join(format!("uverbs{i}")), b"").unwrap();
    }
    fs::write(dir.join("rdma_cm"), b"").unwrap();
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let sys = tmp.path().join("sys");
        let hcas = hostmodel::sysfs::read(&sys);
        let inv = nodes::scan(tmp.path(), &sys, &hcas, Selection::default()).unwrap();
        samples.push(ms(t.elapsed()));
        assert_eq!(inv.nodes.len(), 1025);
    }
    rows.push(Row {
        what: "discovery of 1,024 uverbs nodes (+ rdma_cm)".into(),
        value: summary(samples),
        target: "",
    });
}

/// A host with 16 dual-port InfiniBand HCAs (`mlx5_0` .. `mlx5_15`) and `rdma_cm`.
fn sixteen_hcas(tag: &str) -> Host {
    let host = Host::empty(tag);
    for i in 0..16 {
        host.add_hca(
            &MockHca::connectx(i)
                .numa(i64::from(i / 8))
                .ports(vec![MockPort::ib(mock::ACTIVE), MockPort::ib(mock::ACTIVE)]),
        );
    }
    mock::add_rdma_cm(&host.sys(), Some(&host.root().join("dev"))).unwrap();
    host
}

fn hca_discovery_time(rows: &mut Vec<Row>) {
    let host = sixteen_hcas("bench-hcas");
    let mut samples = Vec::new();
    let mut monitor = health::PortMonitor::new(Duration::from_secs(5));
    for _ in 0..200 {
        let t = Instant::now();
        let h = hostmodel::scan(&host.root(), &host.sys(), Selection::default()).unwrap();
        monitor.observe(&h, Instant::now());
        let g = hostmodel::grant(&h, &Selector::default());
        let a = health::assess(&h, &g, health::Mode::Auto, &monitor);
        samples.push(ms(t.elapsed()));
        assert_eq!((h.hcas.list.len(), a.up), (16, 16));
    }
    rows.push(Row {
        what: "discovery with 16 HCAs x 2 ports: /dev + sysfs read, selection, port health".into(),
        value: summary(samples),
        target: "",
    });
}

/// Port DOWN written to sysfs -> Unhealthy at the kubelet, minus the hold-down: what the
/// plugin adds on top of the hold-down it is asked for (reading interval included).
fn port_down_to_unhealthy(rows: &mut Vec<Row>) {
    let host = Host::empty("bench-portdown");
    host.add_hca(&MockHca::connectx(0));
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start_with(
        &host,
        &["--health-interval", "0.5", "--hold-down", "2"],
        |cmd| {
            cmd.env("RUST_LOG", "info");
        },
    );
    kubelet.expect_registered();
    kubelet.expect_list();
    let hold = 2000.0;
    let mut beyond = Vec::new();
    let mut up = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        host.set_port("mlx5_0", 1, mock::DOWN_POLLING);
        kubelet.expect_health("Unhealthy");
        beyond.push(ms(t0.elapsed()) - hold);
        let t0 = Instant::now();
        host.set_port("mlx5_0", 1, mock::ACTIVE);
        kubelet.expect_health("Healthy");
        up.push(ms(t0.elapsed()));
    }
    rows.push(Row {
        what: "port DOWN -> Unhealthy at the kubelet, beyond the 2 s hold-down (--health-interval 0.5)".into(),
        value: summary(beyond),
        target: "<= one interval (500 ms)",
    });
    rows.push(Row {
        what: "port back ACTIVE -> Healthy at the kubelet (--health-interval 0.5)".into(),
        value: summary(up),
        target: "<= one interval (500 ms)",
    });
}

/// Four resources from one process over 16 HCAs: kubelet restart -> all four registered again;
/// per-HCA Allocate and preferred allocation latency.
fn several_resources(rows: &mut Vec<Row>) {
    let host = sixteen_hcas("bench-4res");
    let first: Vec<String> = (0..8).map(|i| format!("mlx5_{i}")).collect();
    let second: Vec<String> = (8..16).map(|i| format!("mlx5_{i}")).collect();
    let specs = [
        "jarvice.com/rdma".to_string(),
        "jarvice.com/rdma4,shares=4".to_string(),
        format!("jarvice.com/ib,mode=per-hca,hcas={}", first.join(";")),
        format!("jarvice.com/ib2,mode=per-hca,hcas={}", second.join(";")),
    ];
    let names = [
        "jarvice.com/rdma",
        "jarvice.com/rdma4",
        "jarvice.com/ib",
        "jarvice.com/ib2",
    ];
    let mut args: Vec<&str> = Vec::new();
    for s in &specs {
        args.push("--resource");
        args.push(s);
    }
    let mut kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start_with(&host, &args, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    for n in names {
        kubelet.wait_list(n, "a list", |l| !l.devices.is_empty());
    }
    let mut samples = Vec::new();
    let mut extra = 0;
    for _ in 0..20 {
        kubelet.stop_in_place();
        let t0 = Instant::now();
        kubelet = FakeKubelet::start(&host.plugin_dir());
        assert!(wait_for(WAIT, || names
            .iter()
            .all(|n| kubelet.registers_of(n) >= 1)));
        samples.push(ms(t0.elapsed()));
        for n in names {
            kubelet.wait_list(n, "a list", |l| !l.devices.is_empty());
        }
        thread::sleep(Duration::from_millis(300));
        extra += names
            .iter()
            .map(|n| kubelet.registers_of(n) - 1)
            .sum::<usize>();
    }
    rows.push(Row {
        what: "kubelet restart -> all 4 resources registered again (16 HCAs)".into(),
        value: format!("{}; extra Register calls: {extra}", summary(samples)),
        target: "each resource once",
    });

    let ib = kubelet.wait_list("jarvice.com/ib", "8 devices", |l| l.devices.len() == 8);
    let id = ib.devices[3].ID.clone();
    let client = plugin_client(&host.plugin_dir().join("ib.sock"));
    let mut lat = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        client
            .allocate_opt(&alloc_request(&[&[&id]]), opt())
            .unwrap();
        lat.push(ms(t.elapsed()));
    }
    rows.push(Row {
        what: "Allocate of one per-HCA device (16 HCAs, from the daemon's reading)".into(),
        value: summary(lat),
        target: "",
    });
}

fn preferred_sixteen(rows: &mut Vec<Row>) {
    let host = sixteen_hcas("bench-pref");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let _plugin = Plugin::start_with(
        &host,
        &["--resource", "jarvice.com/ib,mode=per-hca"],
        |cmd| {
            cmd.env("RUST_LOG", "info");
        },
    );
    let list = kubelet.wait_list("jarvice.com/ib", "16 devices", |l| l.devices.len() == 16);
    let all: Vec<String> = list.devices.iter().map(|d| d.ID.clone()).collect();
    let client = plugin_client(&host.plugin_dir().join("ib.sock"));
    let mut req = rdma_plugin::kubelet::api::PreferredAllocationRequest::new();
    let mut c = rdma_plugin::kubelet::api::ContainerPreferredAllocationRequest::new();
    c.available_deviceIDs = all;
    c.allocation_size = 4;
    req.container_requests.push(c);
    let mut lat = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        client.get_preferred_allocation_opt(&req, opt()).unwrap();
        lat.push(ms(t.elapsed()));
    }
    rows.push(Row {
        what: "GetPreferredAllocation, 4 of 16 per-HCA devices (from the daemon's reading, NUMA/PCIe choice)"
            .into(),
        value: summary(lat),
        target: "",
    });
}

/// Idle wake-ups with HCAs in sysfs: `ports` mode reads them every interval (the one wake-up
/// allowed), `nodes` mode only on events.
fn idle_health_modes(rows: &mut Vec<Row>) {
    for mode in ["ports", "nodes"] {
        let host = sixteen_hcas("bench-idle-mode");
        let kubelet = FakeKubelet::start(&host.plugin_dir());
        let plugin = Plugin::start_with(&host, &["--health", mode], |cmd| {
            cmd.env("RUST_LOG", "info");
        });
        kubelet.expect_registered();
        kubelet.expect_list();
        idle_figures(&plugin, &format!("--health {mode}, 16 HCAs"), rows);
    }
}

/// (VmRSS KiB, threads, context switches summed over all threads).
fn process_figures(pid: i32) -> (u64, usize, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let rss = field(&status, "VmRSS:");
    let mut switches = 0;
    let mut threads = 0;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            threads += 1;
            let s = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            switches +=
                field(&s, "voluntary_ctxt_switches:") + field(&s, "nonvoluntary_ctxt_switches:");
        }
    }
    (rss, threads, switches)
}

fn idle_figures(plugin: &Plugin, label: &str, rows: &mut Vec<Row>) {
    thread::sleep(Duration::from_secs(1));
    let (_, _, before) = process_figures(plugin.pid());
    thread::sleep(Duration::from_secs(10));
    let (rss, threads, after) = process_figures(plugin.pid());
    rows.push(Row {
        what: format!("idle {label}: RSS / threads / wake-ups in 10 s"),
        value: format!(
            "{:.2} MiB / {threads} / {}",
            rss as f64 / 1024.0,
            after - before
        ),
        target: "RSS < 4 MiB; 0 wake-ups",
    });
}

fn idle_and_streams(rows: &mut Vec<Row>) {
    // No kubelet at all: what the plugin costs a node whose kubelet is down.
    let lonely = Host::new("bench-nokubelet");
    let alone = start_plugin(&lonely);
    assert!(alone.wait_log("is the kubelet running?"));
    idle_figures(&alone, "with no kubelet", rows);
    drop(alone);

    let host = Host::new("bench-idle");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let mut plugin = start_plugin(&host);
    kubelet.expect_registered();
    kubelet.expect_list();
    idle_figures(&plugin, "after registration", rows);

    let client = plugin_client(&host.socket());
    for round in ["1,000", "2,000"] {
        let t0 = Instant::now();
        for _ in 0..1000 {
            open_watch(&client).cancel();
        }
        rows.push(Row {
            what: "1,000 ListAndWatch open -> first list -> close cycles".into(),
            value: format!("{:.0} ms in all", ms(t0.elapsed())),
            target: "",
        });
        idle_figures(&plugin, &format!("after {round} streams"), rows);
    }
    // Idle stream threads exit after 30 s: back to the connected figure.
    thread::sleep(Duration::from_secs(25));
    idle_figures(&plugin, "40 s after the stream churn", rows);

    let streams: Vec<_> = (0..50).map(|_| open_watch(&client)).collect();
    let t0 = Instant::now();
    plugin.signal(libc::SIGTERM);
    let status = plugin.wait_exit(WAIT).expect("exit");
    rows.push(Row {
        what: "SIGTERM with 51 open streams -> exited".into(),
        value: format!("{:.1} ms, {status}", ms(t0.elapsed())),
        target: "< 1 s, exit 0",
    });
    drop(streams);

    // The kubelet stops (kubelet.sock removed): servers stop at once, gRPC after its linger.
    let host = Host::new("bench-left");
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = start_plugin(&host);
    kubelet.expect_registered();
    kubelet.expect_list();
    kubelet.stop();
    assert!(plugin.wait_log("gRPC shut down"));
    idle_figures(&plugin, "after the kubelet stopped", rows);
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let t0 = Instant::now();
    kubelet.expect_registered();
    rows.push(Row {
        what: "kubelet back after gRPC was shut down -> registered (gRPC started again)".into(),
        value: format!("{:.2} ms", ms(t0.elapsed())),
        target: "< 50 ms",
    });
    idle_figures(&plugin, "with the kubelet back", rows);

    // Killed: kubelet.sock stays, refusing. Given up after 15 s, gRPC shut down 5 s later.
    let mut kubelet = kubelet;
    kubelet.crash();
    assert!(wait_for(Duration::from_secs(60), || plugin
        .log_text()
        .matches("gRPC shut down")
        .count()
        == 2));
    idle_figures(
        &plugin,
        "after the kubelet was killed (its socket left)",
        rows,
    );
}

fn binary_size(rows: &mut Vec<Row>) {
    let bin = plugin_bin();
    let size = fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    rows.push(Row {
        what: format!(
            "binary size ({})",
            bin.file_name().unwrap().to_string_lossy()
        ),
        value: format!("{:.2} MiB ({size} bytes)", size as f64 / 1048576.0),
        target: "",
    });
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn main() {
    let bin = plugin_bin();
    assert!(
        Path::new(&bin).exists(),
        "no plugin binary at {}",
        bin.display()
    );
    eprintln!("benchmarking {} ...", bin.display());
    let mut rows = Vec::new();
    binary_size(&mut rows);
    // `bench dra` / `bench metrics`: those rows alone.
    let only_dra = std::env::args().nth(1).as_deref() == Some("dra");
    #[cfg(feature = "metrics")]
    if std::env::args().nth(1).as_deref() == Some("metrics") {
        metrics::figures(&mut rows);
        print_table(&bin, rows);
        return;
    }
    #[cfg(feature = "dra")]
    if only_dra {
        dra::figures(&mut rows);
        print_table(&bin, rows);
        return;
    }
    start_to_registered(&mut rows);
    hot_plug(&mut rows);
    kubelet_restarts(&mut rows);
    recovery::plugin_dir_recreated(&mut rows);
    recovery::spec_restored(&mut rows);
    sigterm_exit(&mut rows);
    allocate_latency(&mut rows);
    largest_answer(&mut rows);
    discovery_time(&mut rows);
    hca_discovery_time(&mut rows);
    port_down_to_unhealthy(&mut rows);
    several_resources(&mut rows);
    preferred_sixteen(&mut rows);
    idle_health_modes(&mut rows);
    idle_and_streams(&mut rows);
    #[cfg(feature = "metrics")]
    metrics::figures(&mut rows);
    #[cfg(feature = "dra")]
    dra::figures(&mut rows);

    let _ = only_dra;
    print_table(&bin, rows);
}

fn print_table(bin: &Path, rows: Vec<Row>) {
    println!("Machine: {}", machine());
    println!("Binary: {}\n", bin.display());
    println!("| measure | result | target |");
    println!("|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.what, r.value, r.target);
    }
}
