//! `jarvice-rdma-plugin list`: what the plugin would advertise and the Allocate answer it would
//! give on this host, HCA by HCA, from the same flags as the daemon, with no kubelet needed.

use std::fmt::Write as _;
use std::time::Instant;

use crate::config::Config;
use crate::host::health::{Health, PortMonitor};
use crate::host::select::Verdict;
use crate::host::sysfs::Hca;
use crate::host::{self, nodes, Grant, Host};
use crate::kubelet::api;
use crate::resource::device_specs;
use crate::tools::json::{array, opt, quote};

/// One reading, as the daemon would assess it at start.
struct Report<'a> {
    cfg: &'a Config,
    host: std::sync::Arc<Host>,
    grant: Grant,
    health: Health,
    list: api::ListAndWatchResponse,
    specs: Vec<api::DeviceSpec>,
    /// Each HCA's advertised per-HCA ID.
    ids: std::collections::HashMap<String, String>,
}

/// Renders the report; `Err` when the device directory cannot be listed at all.
/// Every resource's report: one as today (the drop-in), several one after the other (JSON: an
/// object with `resources`).
pub fn report(cfg: &Config, json: bool) -> Result<String, nodes::Error> {
    let units = cfg.units();
    let mut parts = Vec::new();
    for unit in &units {
        parts.push(report_one(unit, json)?);
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Ok(if json {
        let trimmed: Vec<&str> = parts.iter().map(|p| p.trim_end()).collect();
        format!("{{\"resources\":[{}]}}\n", trimmed.join(","))
    } else {
        parts.join("\n========\n\n")
    })
}

fn report_one(cfg: &Config, json: bool) -> Result<String, nodes::Error> {
    let h = host::scan(&cfg.host_root, &cfg.sysfs, cfg.selection())?;
    let mut monitor = PortMonitor::new(cfg.hold_down);
    let a = host::assess(
        std::sync::Arc::new(h),
        &cfg.selector,
        &cfg.taken,
        cfg.health,
        &mut monitor,
        Instant::now(),
    );
    let list = cfg.resource().device_list(&a);
    let specs = device_specs(&a.grant.nodes);
    let r = Report {
        cfg,
        ids: host::hca_ids(&a.host.hcas),
        host: a.host,
        grant: a.grant,
        health: a.health,
        list,
        specs,
    };
    Ok(if json { as_json(&r) } else { as_table(&r) })
}

fn numa_of(d: &api::Device) -> Vec<i64> {
    d.topology.nodes.iter().map(|n| n.ID).collect()
}

fn verdict_of<'a>(r: &'a Report<'_>, hca: &str) -> Option<&'a Verdict> {
    r.grant
        .verdicts
        .iter()
        .find(|(n, _)| n == hca)
        .map(|(_, v)| v)
}

fn pci_ids(hca: &Hca) -> Option<String> {
    let p = hca.pci.as_ref()?;
    Some(format!("{:04x}:{:04x}", p.vendor?, p.device?))
}

fn as_table(r: &Report<'_>) -> String {
    let cfg = r.cfg;
    let mut out = String::new();
    let _ = writeln!(out, "resource  {}", cfg.resource_name);
    if cfg.per_hca {
        let _ = writeln!(out, "devices   one per HCA");
    }
    let _ = writeln!(out, "socket    {}", cfg.socket_path().display());
    let _ = writeln!(out, "root      {}", cfg.host_root.display());
    let _ = writeln!(out, "sysfs     {}", cfg.sysfs.display());
    let _ = writeln!(out, "granting  {}", cfg.selector.describe());
    let word = if r.health.healthy {
        "Healthy"
    } else {
        "Unhealthy"
    };
    let _ = writeln!(
        out,
        "health    {word}: {} (rule {})",
        r.health.reason, r.health.mode
    );
    if r.host.hcas.list.is_empty() {
        let _ = writeln!(
            out,
            "\n(sysfs lists no HCA under {})",
            cfg.sysfs.join("class/infiniband").display()
        );
    }
    for hca in &r.host.hcas.list {
        let granted = match verdict_of(r, &hca.name) {
            Some(Verdict::Selected) | None => "granted".to_string(),
            Some(Verdict::Excluded(why)) => format!("not granted: {why}"),
        };
        let id = r.ids.get(&hca.name).cloned().unwrap_or_default();
        let _ = writeln!(out, "\nHCA {} ({id})  {granted}", hca.name);
        for p in &hca.ports {
            let link = p.link_layer.as_ref().map_or("?", |l| l.as_str());
            let rate = p.rate.as_deref().unwrap_or("?");
            let _ = writeln!(out, "  port {}  {}  {link}  {rate}", p.number, p.describe());
        }
        if hca.ports.is_empty() {
            let _ = writeln!(out, "  ports   (none in sysfs)");
        }
        let numa = hca.numa_node().map_or("unknown".into(), |n| n.to_string());
        let _ = writeln!(out, "  numa    {numa}");
        match &hca.pci {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "  pci     {} ({})  path {}",
                    p.address,
                    pci_ids(hca).as_deref().unwrap_or("?"),
                    p.path.join("/")
                );
            }
            None => {
                let _ = writeln!(out, "  pci     unknown");
            }
        }
        let _ = writeln!(
            out,
            "  guid    {}  fw {}",
            hca.node_guid.as_deref().unwrap_or("?"),
            hca.fw_ver.as_deref().unwrap_or("?")
        );
        let _ = writeln!(
            out,
            "  netdevs {}",
            if hca.netdevs.is_empty() {
                "-".to_string()
            } else {
                hca.netdevs.join(" ")
            }
        );
        let nodes: Vec<&str> = hca
            .verbs
            .iter()
            .chain(&hca.mad)
            .map(|e| e.name.as_str())
            .collect();
        let _ = writeln!(out, "  nodes   {}", nodes.join(" "));
    }
    let _ = writeln!(out, "\nDEVICE ID   HEALTH      NUMA");
    for d in &r.list.devices {
        let numa: Vec<String> = numa_of(d).iter().map(i64::to_string).collect();
        let numa = if numa.is_empty() {
            "-".to_string()
        } else {
            numa.join(",")
        };
        let _ = writeln!(out, "{:<11} {:<11} {numa}", d.ID, d.health);
    }
    if !r.host.nodes.refused.is_empty() {
        let _ = writeln!(out, "\nREFUSED (named like device nodes, never granted)");
        for x in &r.host.nodes.refused {
            let _ = writeln!(out, "{}: {}", x.host_path, x.why);
        }
    }
    let _ = writeln!(out, "\nALLOCATE (per container)");
    if r.specs.is_empty() {
        let _ = writeln!(
            out,
            "(no device nodes found under {})",
            cfg.host_root.join("dev").display()
        );
    }
    for s in &r.specs {
        let _ = writeln!(
            out,
            "{} -> {} {}",
            s.host_path, s.container_path, s.permissions
        );
    }
    out
}

fn hca_json(r: &Report<'_>, hca: &Hca) -> String {
    let ports = array(hca.ports.iter().map(|p| {
        format!(
            "{{\"port\":{},\"state\":{},\"phys_state\":{},\"link_layer\":{},\"rate\":{},\"up\":{}}}",
            p.number,
            opt(p.state.as_ref().map(|s| s.text.as_str())),
            opt(p.phys_state.as_ref().map(|s| s.text.as_str())),
            opt(p.link_layer.as_ref().map(|l| l.as_str())),
            opt(p.rate.as_deref()),
            p.is_up()
        )
    }));
    let (granted, why) = match verdict_of(r, &hca.name) {
        Some(Verdict::Excluded(why)) => (false, Some(why.as_str())),
        _ => (true, None),
    };
    let pci = hca.pci.as_ref();
    let nodes = array(hca.verbs.iter().chain(&hca.mad).map(|e| {
        format!(
            "{{\"name\":{},\"port\":{},\"dev\":{}}}",
            quote(&e.name),
            e.port.map_or("null".into(), |p| p.to_string()),
            opt(e.dev.map(|d| d.to_string()).as_deref())
        )
    }));
    format!(
        "{{\"name\":{},\"id\":{},\"granted\":{granted},\"why_not\":{},\"ports\":{ports},\"numa_node\":{},\"pci_address\":{},\"pci_path\":{},\"pci_id\":{},\"node_guid\":{},\"fw_ver\":{},\"netdevs\":{},\"nodes\":{nodes}}}",
        quote(&hca.name),
        quote(r.ids.get(&hca.name).map_or("", String::as_str)),
        opt(why),
        hca.numa_node().map_or("null".into(), |n| n.to_string()),
        opt(pci.map(|p| p.address.as_str())),
        array(pci.map(|p| p.path.clone()).unwrap_or_default().iter().map(|s| quote(s))),
        opt(pci_ids(hca).as_deref()),
        opt(hca.node_guid.as_deref()),
        opt(hca.fw_ver.as_deref()),
        array(hca.netdevs.iter().map(|n| quote(n))),
    )
}

fn as_json(r: &Report<'_>) -> String {
    let cfg = r.cfg;
    let devices = array(r.list.devices.iter().map(|d| {
        let numa: Vec<String> = numa_of(d).iter().map(i64::to_string).collect();
        format!(
            "{{\"id\":{},\"health\":{},\"numa_nodes\":[{}]}}",
            quote(&d.ID),
            quote(&d.health),
            numa.join(",")
        )
    }));
    let specs = array(r.specs.iter().map(|s| {
        format!(
            "{{\"container_path\":{},\"host_path\":{},\"permissions\":{}}}",
            quote(&s.container_path),
            quote(&s.host_path),
            quote(&s.permissions)
        )
    }));
    let hcas = array(r.host.hcas.list.iter().map(|h| hca_json(r, h)));
    let refused = array(r.host.nodes.refused.iter().map(|x| {
        format!(
            "{{\"host_path\":{},\"why\":{}}}",
            quote(&x.host_path),
            quote(&x.why)
        )
    }));
    format!(
        "{{\"resource_name\":{},\"socket\":{},\"host_root\":{},\"sysfs\":{},\"selection\":{},\"health\":{{\"healthy\":{},\"rule\":{},\"reason\":{},\"hcas_up\":{},\"hcas_granted\":{}}},\"hcas\":{hcas},\"refused\":{refused},\"devices\":{devices},\"allocate\":{{\"devices\":{specs}}}}}\n",
        quote(&cfg.resource_name),
        quote(&cfg.socket_path().to_string_lossy()),
        quote(&cfg.host_root.to_string_lossy()),
        quote(&cfg.sysfs.to_string_lossy()),
        quote(&cfg.selector.describe()),
        r.health.healthy,
        quote(&r.health.mode.to_string()),
        quote(&r.health.reason),
        r.health.up,
        r.health.total,
    )
}
