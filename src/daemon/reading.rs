//! One reading of the host as the daemon serves it (what is granted, its health, the device
//! list sent to the kubelet), and the log lines that say what changed between two readings.

use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};

use crate::config::Config;
use crate::daemon::snapshot::Snapshot;
use crate::host::health::{Health, PortMonitor, Transition};
use crate::host::{self, Assessment, Grant, Host};
use crate::kubelet::api;
use crate::kubelet::service::{Served, Settings};
use crate::observe::{Observer, Read};
use crate::resource::{HEALTHY, UNHEALTHY};

/// One reading and what the daemon made of it.
pub struct Reading {
    pub host: Arc<Host>,
    /// Why device discovery failed, if it did.
    pub error: Option<String>,
    pub grant: Grant,
    pub health: Health,
    /// The ListAndWatch list this reading makes.
    pub list: api::ListAndWatchResponse,
    pub transitions: Vec<Transition>,
}

impl Reading {
    /// Assesses the shared `snapshot` for this resource, feeding `monitor`.
    pub fn take(
        snapshot: &Snapshot,
        settings: &Settings,
        cfg: &Config,
        monitor: &mut PortMonitor,
        at: Instant,
    ) -> Reading {
        let a = host::assess(
            Arc::clone(&snapshot.host),
            &settings.selector,
            &settings.taken,
            cfg.health,
            monitor,
            at,
        );
        let list = settings.resource.device_list(&a);
        Reading {
            host: a.host,
            error: snapshot.error.clone(),
            grant: a.grant,
            health: a.health,
            list,
            transitions: a.transitions,
        }
    }

    /// What the gRPC handlers answer from, for this reading.
    pub fn served(&self) -> Arc<Served> {
        Arc::new(Served {
            assessment: Assessment {
                host: Arc::clone(&self.host),
                grant: self.grant.clone(),
                health: self.health.clone(),
                transitions: Vec::new(),
            },
            error: self.error.clone(),
        })
    }

    /// Makes every device of this reading Unhealthy for a reason outside the host (a CDI spec
    /// that cannot be written): the kubelet must send no pod here that would fail to start.
    pub fn fail(&mut self, reason: String) {
        self.health.healthy = false;
        self.health.up_hcas.clear();
        self.health.reason = reason;
        for d in &mut self.list.devices {
            d.health = UNHEALTHY.to_string();
        }
    }

    /// True when the kubelet must hear of it: the list changed, or the nodes did (the kubelet
    /// takes every message as the whole list, and a repeat tells it the news promptly).
    pub fn news_since(&self, old: &Reading) -> bool {
        self.list != old.list || self.grant.nodes != old.grant.nodes
    }

    /// The log lines of a (re)start: HCAs (when they differ from `old`'s), transitions, refused
    /// nodes and what is advertised.
    pub fn log_start(&self, cfg: &Config, old: Option<&Reading>) {
        for t in &self.transitions {
            self.log_transition(cfg, t);
        }
        if old.map(|o| hca_names(&o.host)) != Some(hca_names(&self.host)) {
            self.log_hcas(cfg);
        }
        self.log_refused();
        self.log_inventory(cfg, "advertising");
    }

    /// The log lines of what changed since `old`: each port transition once, refused nodes,
    /// granted nodes, health, the set of HCAs.
    pub fn log_changes(&self, cfg: &Config, old: &Reading) {
        for t in &self.transitions {
            self.log_transition(cfg, t);
        }
        if self.host.nodes.refused != old.host.nodes.refused {
            self.log_refused();
        }
        if self.grant.nodes != old.grant.nodes {
            self.log_inventory(cfg, "device nodes changed");
        } else if self.health.healthy != old.health.healthy && self.transitions.is_empty() {
            self.log_inventory(cfg, "health changed");
        }
        if hca_names(&self.host) != hca_names(&old.host) {
            self.log_hcas(cfg);
        }
    }

    /// Tells `observer` what this reading says and what changed since `old`.
    pub fn observe(&self, cfg: &Config, old: Option<&Reading>, observer: &Observer) {
        let healthy_devices = self
            .list
            .devices
            .iter()
            .filter(|d| d.health == HEALTHY)
            .count();
        observer.reading(
            Read {
                resource: &cfg.resource_name,
                host: &self.host,
                granted: &self.grant.hcas,
                health: &self.health,
                transitions: &self.transitions,
            },
            self.list.devices.len() as u64,
            healthy_devices as u64,
            old.is_none(),
        );
    }

    /// Nodes that look like ours but failed verification: never granted, and said loudly.
    fn log_refused(&self) {
        for x in &self.host.nodes.refused {
            warn!("refusing {}: {}", x.host_path, x.why);
        }
    }

    /// `mlx5_1 port 1: DOWN (Polling): jarvice.com/rdma is Unhealthy (0 of 2 HCAs up)`.
    fn log_transition(&self, cfg: &Config, t: &Transition) {
        let now = self;
        let what = if t.up { "up" } else { "down" };
        if !now.grant.hcas.contains(&t.hca) {
            debug!(
                "{} port {}: {} ({what}), not granted by {}",
                t.hca, t.port, t.state, cfg.resource_name
            );
            return;
        }
        let level = if now.health.healthy && t.up {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "{} port {}: {}: {} is {} ({})",
            t.hca,
            t.port,
            t.state,
            cfg.resource_name,
            health_word(&now.health),
            now.health.reason
        );
    }

    /// One line naming the granted nodes and the resulting health; a warning when Unhealthy.
    pub fn log_inventory(&self, cfg: &Config, what: &str) {
        let now = self;
        let level = if now.health.healthy {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        let paths: Vec<String> = now
            .grant
            .nodes
            .nodes
            .iter()
            .map(|n| n.host_path.display().to_string())
            .collect();
        log::log!(
            level,
            "{what}: {} node(s) [{}], {} is {} ({}, health from {})",
            paths.len(),
            paths.join(", "),
            cfg.resource_name,
            health_word(&now.health),
            now.health.reason,
            now.health.mode
        );
    }

    /// One line per HCA: ports, NUMA, PCI, nodes, selected or why not.
    fn log_hcas(&self, cfg: &Config) {
        let now = self;
        if now.host.hcas.list.is_empty() {
            info!(
                "sysfs at {} lists no HCA: health from device nodes, every node granted as found",
                cfg.sysfs.display()
            );
        }
        for (hca, (_, verdict)) in now.host.hcas.list.iter().zip(&now.grant.verdicts) {
            let ports: Vec<String> = hca.ports.iter().map(|p| p.summary()).collect();
            let ports = if ports.is_empty() {
                vec!["no ports in sysfs".to_string()]
            } else {
                ports
            };
            let nodes: Vec<&str> = hca.verbs.iter().map(|e| e.name.as_str()).collect();
            let numa = hca.numa_node().map_or("?".into(), |n| n.to_string());
            let pci = hca.pci.as_ref().map_or("?", |p| p.address.as_str());
            let verdict = match verdict {
                host::select::Verdict::Selected => "granted".to_string(),
                host::select::Verdict::Excluded(why) => format!("not granted: {why}"),
            };
            info!(
                "HCA {}: {}; NUMA {numa}; PCI {pci}; nodes {}; {verdict}",
                hca.name,
                ports.join(", "),
                nodes.join(",")
            );
        }
    }
}

fn health_word(h: &Health) -> &'static str {
    if h.healthy {
        HEALTHY
    } else {
        UNHEALTHY
    }
}

/// Only which HCAs exist is compared, not their ports' raw states.
fn hca_names(h: &Host) -> Vec<&str> {
    h.hcas.list.iter().map(|x| x.name.as_str()).collect()
}
