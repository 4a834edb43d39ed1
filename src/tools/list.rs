//! `jarvice-rdma-plugin list`: what the plugin would advertise and the Allocate answer it would
//! give on this host, from the same flags as the daemon, with no kubelet needed.

use std::fmt::Write as _;

use crate::kubelet::api;
use crate::config::Config;
use crate::host::nodes;
use crate::resource::device_specs;

/// Renders the report; `Err` when the device directory cannot be listed at all.
pub fn report(cfg: &Config, json: bool) -> Result<String, nodes::Error> {
    let inv = nodes::scan(&cfg.host_root, &cfg.sysfs, cfg.selection())?;
    let list = cfg.resource().device_list(&inv);
    let specs = device_specs(&inv);
    Ok(if json {
        as_json(cfg, &list, &specs)
    } else {
        as_table(cfg, &list, &specs)
    })
}

fn numa_of(d: &api::Device) -> Vec<i64> {
    d.topology.nodes.iter().map(|n| n.ID).collect()
}

fn as_table(cfg: &Config, list: &api::ListAndWatchResponse, specs: &[api::DeviceSpec]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "resource  {}", cfg.resource_name);
    let _ = writeln!(out, "socket    {}", cfg.socket_path().display());
    let _ = writeln!(out, "root      {}", cfg.host_root.display());
    let _ = writeln!(out, "\nDEVICE ID   HEALTH      NUMA");
    for d in &list.devices {
        let numa: Vec<String> = numa_of(d).iter().map(i64::to_string).collect();
        let numa = if numa.is_empty() {
            "-".to_string()
        } else {
            numa.join(",")
        };
        let _ = writeln!(out, "{:<11} {:<11} {numa}", d.ID, d.health);
    }
    let _ = writeln!(out, "\nALLOCATE (per container)");
    if specs.is_empty() {
        let _ = writeln!(
            out,
            "(no device nodes found under {})",
            cfg.host_root.join("dev").display()
        );
    }
    for s in specs {
        let _ = writeln!(
            out,
            "{} -> {} {}",
            s.host_path, s.container_path, s.permissions
        );
    }
    out
}

/// Minimal JSON string quoting (no serde: the card keeps runtime crates to a fixed few).
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(q, "\\u{:04x}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn as_json(cfg: &Config, list: &api::ListAndWatchResponse, specs: &[api::DeviceSpec]) -> String {
    let devices: Vec<String> = list
        .devices
        .iter()
        .map(|d| {
            let numa: Vec<String> = numa_of(d).iter().map(i64::to_string).collect();
            format!(
                "{{\"id\":{},\"health\":{},\"numa_nodes\":[{}]}}",
                quote(&d.ID),
                quote(&d.health),
                numa.join(",")
            )
        })
        .collect();
    let specs: Vec<String> = specs
        .iter()
        .map(|s| {
            format!(
                "{{\"container_path\":{},\"host_path\":{},\"permissions\":{}}}",
                quote(&s.container_path),
                quote(&s.host_path),
                quote(&s.permissions)
            )
        })
        .collect();
    format!(
        "{{\"resource_name\":{},\"socket\":{},\"host_root\":{},\"devices\":[{}],\"allocate\":{{\"devices\":[{}]}}}}\n",
        quote(&cfg.resource_name),
        quote(&cfg.socket_path().to_string_lossy()),
        quote(&cfg.host_root.to_string_lossy()),
        devices.join(","),
        specs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
