//! The host model: what a node has, as pure functions of a `/dev` and a `/sys` tree. Nothing
//! here knows about gRPC or the kubelet, so any front-end (the device plugin today, a DRA
//! driver later) can serve it.
//!
//! - [`nodes`]: the device nodes under `<root>/dev` (what a pod can be given);
//! - [`sysfs`]: the HCAs behind them (ports, PCI, NUMA, netdevs), from `/sys`;
//! - [`select`]: which HCAs a resource grants;
//! - [`health`]: port-state health with hold-down;
//! - [`mock`]: trees laid out as the kernel does, for tests, the demo and the benchmark.

use std::path::Path;
use std::sync::Arc;

pub mod health;
pub mod mock;
pub mod nodes;
pub mod select;
pub mod sysfs;

use nodes::{Inventory, Kind};
use select::Selector;
use sysfs::Hcas;

/// One reading of a node: its device nodes and the HCAs sysfs describes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    pub nodes: Inventory,
    pub hcas: Hcas,
}

/// Reads `root/dev` and `sysfs`. Only an unreadable device directory is an error; what sysfs
/// cannot tell stays unknown (see [`Hcas::notes`]).
pub fn scan(root: &Path, sysfs: &Path, which: nodes::Selection) -> Result<Host, nodes::Error> {
    // sysfs first: the nodes take what it says of each of them from this one reading.
    let hcas = sysfs::read(sysfs);
    let nodes = nodes::scan(root, sysfs, &hcas, which)?;
    Ok(Host { nodes, hcas })
}

/// A stable ID for an HCA, the same across plugin and kubelet restarts and driver reloads
/// (which can reorder names like `mlx5_3`): from its node GUID (`hca-0c42a10300c45e2a`), else
/// its PCI address (`pci-0000:3b:00.0`), else its name (`name-mlx5_3`, the one unstable kind).
/// Never an index, so two plugins' IDs do not collide (kubelets up to 1.36 match health to pods
/// by device ID alone).
pub fn hca_id(hca: &sysfs::Hca) -> String {
    let guid = hca
        .node_guid
        .as_deref()
        .map(|g| g.replace(':', "").to_ascii_lowercase())
        .filter(|g| {
            !g.is_empty()
                && g.bytes().all(|b| b.is_ascii_hexdigit())
                && g.bytes().any(|b| b != b'0')
        });
    if let Some(g) = guid {
        return format!("hca-{g}");
    }
    match &hca.pci {
        Some(p) => format!("pci-{}", p.address),
        None => format!("name-{}", hca.name),
    }
}

/// Every HCA's ID ([`hca_id`]), unique over the host: a GUID that several HCAs share (virtual
/// functions may) identifies none of them, so each of those takes its PCI address. Computed
/// over all HCAs, not per resource, so an ID means the same HCA whatever the names' order and
/// whichever resource advertises it.
pub fn hca_ids(hcas: &sysfs::Hcas) -> std::collections::HashMap<String, String> {
    let mut count: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for h in &hcas.list {
        *count.entry(hca_id(h)).or_default() += 1;
    }
    hcas.list
        .iter()
        .map(|h| {
            let id = hca_id(h);
            let id = if count[&id] > 1 {
                match &h.pci {
                    Some(p) => format!("pci-{}", p.address),
                    None => format!("name-{}", h.name),
                }
            } else {
                id
            };
            (h.name.clone(), id)
        })
        .collect()
}

/// One reading of the host and what it means for a resource: what is granted, its health, and
/// the ports whose reported state changed since the last reading. The reading itself is shared
/// (one per change of the host, whatever the number of resources and front-ends).
#[derive(Clone, Debug)]
pub struct Assessment {
    pub host: Arc<Host>,
    pub grant: Grant,
    pub health: health::Health,
    pub transitions: Vec<health::Transition>,
}

/// Feeds `host`, read at `now`, to `monitor` and assesses what `selector` grants under `mode`.
/// The daemon keeps one monitor for its lifetime; `list` and `diagnose` use a fresh one.
pub fn assess(
    host: Arc<Host>,
    selector: &Selector,
    taken: &[(String, Selector)],
    mode: health::Mode,
    monitor: &mut health::PortMonitor,
    now: std::time::Instant,
) -> Assessment {
    let transitions = monitor.observe(&host, now);
    let grant = grant_except(&host, selector, taken);
    let health = health::assess(&host, &grant, mode, monitor);
    Assessment {
        host,
        grant,
        health,
        transitions,
    }
}

/// What a selector grants on a host: the HCAs and the device nodes that go into Allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Selected HCAs by name (every HCA sysfs lists, with an empty selector).
    pub hcas: Vec<String>,
    /// Why each HCA sysfs lists is selected or not, in HCA order.
    pub verdicts: Vec<(String, select::Verdict)>,
    /// The nodes to grant, in discovery order.
    pub nodes: Inventory,
    /// Why nothing can be granted although a selector is set (it matches no HCA, or it needs
    /// sysfs and sysfs lists none): the resource is Unhealthy and this says why.
    pub problem: Option<String>,
    /// With `--link-layer`, the only ports whose state counts for health.
    pub link: Option<sysfs::LinkLayer>,
}

/// [`grant`], less the HCAs that `taken` selectors (per-HCA resources declared earlier) already
/// select: one HCA is never granted as a device of two per-HCA resources.
pub fn grant_except(host: &Host, selector: &Selector, taken: &[(String, Selector)]) -> Grant {
    let mut g = grant(host, selector);
    if taken.is_empty() {
        return g;
    }
    let mut gone = Vec::new();
    for (name, verdict) in &mut g.verdicts {
        let Some(hca) = host.hcas.get(name) else {
            continue;
        };
        if let Some((owner, _)) = taken
            .iter()
            .find(|(_, s)| verdict.is_selected() && s.check(hca).is_selected())
        {
            *verdict = select::Verdict::Excluded(format!("granted per HCA by {owner}"));
            gone.push(name.clone());
        }
    }
    g.hcas.retain(|h| !gone.contains(h));
    g.nodes
        .nodes
        .retain(|n| !n.hca.as_ref().is_some_and(|h| gone.contains(h)));
    if g.hcas.is_empty() && g.problem.is_none() && !host.hcas.list.is_empty() {
        g.problem = Some(format!(
            "{} matches only HCAs other resources grant",
            selector.describe()
        ));
        g.nodes.nodes.clear();
    }
    g
}

/// Applies `selector` to `host`. With an empty selector every node is granted, whether sysfs
/// knows it or not (the drop-in's behaviour). Otherwise only the `uverbs`/`umad`/`issm` nodes
/// that sysfs attributes to a selected HCA, and `rdma_cm` and `knem` while any HCA is selected.
pub fn grant(host: &Host, selector: &Selector) -> Grant {
    let verdicts: Vec<(String, select::Verdict)> = host
        .hcas
        .list
        .iter()
        .map(|h| (h.name.clone(), selector.check(h)))
        .collect();
    let hcas: Vec<String> = verdicts
        .iter()
        .filter(|(_, v)| v.is_selected())
        .map(|(n, _)| n.clone())
        .collect();
    if selector.is_empty() {
        return Grant {
            hcas,
            verdicts,
            nodes: host.nodes.clone(),
            problem: None,
            link: None,
        };
    }
    let problem = if host.hcas.list.is_empty() {
        Some(format!(
            "{} needs sysfs, and sysfs lists no HCA",
            selector.describe()
        ))
    } else if hcas.is_empty() {
        Some(format!("{} matches no HCA", selector.describe()))
    } else {
        None
    };
    let nodes = host
        .nodes
        .nodes
        .iter()
        .filter(|n| match n.kind {
            Kind::RdmaCm | Kind::Knem => !hcas.is_empty(),
            _ => n.hca.as_ref().is_some_and(|h| hcas.contains(h)),
        })
        .cloned()
        .collect();
    Grant {
        hcas,
        verdicts,
        nodes: Inventory {
            nodes,
            refused: host.nodes.refused.clone(),
        },
        problem,
        link: match &selector.link {
            select::LinkSelect::Only(l) => Some(l.clone()),
            select::LinkSelect::Any => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::{self, MockHca};
    use crate::host::select::{LinkSelect, NamePatterns};
    use std::fs;
    use std::path::PathBuf;

    fn tree(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rdma-host-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("dev")).unwrap();
        dir
    }

    fn paths(g: &Grant) -> Vec<String> {
        g.nodes
            .nodes
            .iter()
            .map(|n| n.host_path.display().to_string())
            .collect()
    }

    #[test]
    fn nodes_are_attributed_through_sysfs_and_selection_grants_only_theirs() {
        let t = tree("grant");
        let (sys, dev) = (t.join("sys"), t.join("dev"));
        mock::add_hca(&sys, Some(&dev), &MockHca::connectx(0).uverbs(1)).unwrap();
        mock::add_hca(&sys, Some(&dev), &MockHca::roce(1).uverbs(0)).unwrap();
        mock::add_rdma_cm(&sys, Some(&dev)).unwrap();
        fs::write(dev.join("knem"), "").unwrap();
        // A node sysfs does not describe.
        fs::write(dev.join("infiniband/uverbs7"), "").unwrap();
        let mad = nodes::Selection { mad: true };
        let h = scan(&t, &sys, mad).unwrap();
        let by_path = |p: &str| {
            h.nodes
                .nodes
                .iter()
                .find(|n| n.host_path.to_str() == Some(p))
                .and_then(|n| n.hca.clone())
        };
        assert_eq!(
            by_path("/dev/infiniband/uverbs1").as_deref(),
            Some("mlx5_0")
        );
        assert_eq!(
            by_path("/dev/infiniband/uverbs0").as_deref(),
            Some("mlx5_1")
        );
        assert_eq!(by_path("/dev/infiniband/umad2").as_deref(), Some("mlx5_1"));
        assert_eq!(by_path("/dev/infiniband/uverbs7"), None);

        // No selector: everything, whether sysfs knows it or not (drop-in).
        let all = grant(&h, &Selector::default());
        assert_eq!(all.nodes, h.nodes);
        assert_eq!(all.hcas, ["mlx5_0", "mlx5_1"]);

        let ib = Selector {
            link: LinkSelect::parse("infiniband").unwrap(),
            ..Selector::default()
        };
        let g = grant(&h, &ib);
        assert_eq!(g.problem, None);
        assert_eq!(
            paths(&g),
            [
                "/dev/infiniband/uverbs1",
                "/dev/infiniband/rdma_cm",
                "/dev/infiniband/umad0",
                "/dev/infiniband/issm0",
                "/dev/knem"
            ]
        );

        let none = Selector {
            names: Some(NamePatterns::parse("hfi1_*").unwrap()),
            ..Selector::default()
        };
        let g = grant(&h, &none);
        assert!(g.nodes.nodes.is_empty(), "not even rdma_cm or knem");
        assert_eq!(g.problem.as_deref(), Some("--hcas hfi1_* matches no HCA"));

        // A selector where sysfs lists nothing.
        let bare = Host {
            nodes: h.nodes.clone(),
            hcas: sysfs::Hcas::default(),
        };
        let g = grant(&bare, &ib);
        assert!(g.nodes.nodes.is_empty());
        assert!(g.problem.unwrap().contains("needs sysfs"));
        fs::remove_dir_all(&t).unwrap();
    }
}
