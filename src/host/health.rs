//! Health from the IB ports, with the safeguards port monitors learned the hard way:
//! - going down takes effect only after a port stayed down for the hold-down time (a switch
//!   reboot or a flap must not bounce admissions); coming back up takes effect at once;
//! - a port that was never up since we started and is `Disabled` or `Polling` (an uncabled
//!   second port) is not news: no transition, and it makes its HCA neither down nor degraded;
//!   an HCA is up while any of its ports is, degraded while another port that counts is down;
//! - what sysfs cannot tell (an HCA without readable port states) falls back to the nodes rule
//!   for that HCA.
//!
//! Time is an argument, so every rule is a pure function a test can drive with made-up instants.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::host::nodes::Kind;
use crate::host::sysfs::Port;
use crate::host::{Grant, Host};

/// Which rule decides health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `ports` when sysfs describes the HCAs, `nodes` otherwise (the default).
    Auto,
    /// Healthy while a granted HCA has an ACTIVE/LinkUp port and its `uverbs` node.
    Ports,
    /// Healthy while a granted `uverbs` node exists (the drop-in's rule).
    Nodes,
}

impl Mode {
    pub fn parse(raw: &str) -> Option<Mode> {
        match raw {
            "auto" => Some(Mode::Auto),
            "ports" => Some(Mode::Ports),
            "nodes" => Some(Mode::Nodes),
            _ => None,
        }
    }

    /// The rule that applies to `host` now: `Auto` becomes `Ports` once sysfs describes HCAs
    /// (a driver loaded late turns it on).
    pub fn resolve(self, host: &Host) -> Mode {
        match self {
            Mode::Auto if host.hcas.described() => Mode::Ports,
            Mode::Auto => Mode::Nodes,
            m => m,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Ports => "ports",
            Mode::Nodes => "nodes",
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Track {
    /// Up at some reading since we started.
    ever_up: bool,
    /// What we report: up, or down for longer than the hold-down.
    up: bool,
    /// Down at the readings since this instant, while still reported up.
    down_since: Option<Instant>,
}

/// A port whose reported state changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub hca: String,
    pub port: u32,
    pub up: bool,
    /// `DOWN (Polling)`, `ACTIVE (LinkUp)`.
    pub state: String,
}

/// Remembers every port's reported state between readings of sysfs.
#[derive(Debug)]
pub struct PortMonitor {
    hold_down: Duration,
    tracks: HashMap<(String, u32), Track>,
}

impl PortMonitor {
    pub fn new(hold_down: Duration) -> PortMonitor {
        PortMonitor {
            hold_down,
            tracks: HashMap::new(),
        }
    }

    /// Feeds one reading of every port of `host`, taken at `now`; returns the ports whose
    /// reported state changed. A port seen for the first time is reported as it reads, without
    /// a transition (the start-up log names it).
    pub fn observe(&mut self, host: &Host, now: Instant) -> Vec<Transition> {
        let mut changed = Vec::new();
        let mut seen = HashSet::new();
        for hca in &host.hcas.list {
            for port in &hca.ports {
                let key = (hca.name.clone(), port.number);
                let up_now = port.is_up();
                let track = self.tracks.entry(key.clone()).or_insert(Track {
                    ever_up: up_now,
                    up: up_now,
                    down_since: None,
                });
                let before = track.up;
                if up_now {
                    track.ever_up = true;
                    track.up = true;
                    track.down_since = None;
                } else if track.up {
                    let since = *track.down_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= self.hold_down {
                        track.up = false;
                        track.down_since = None;
                    }
                }
                if track.up != before {
                    changed.push(Transition {
                        hca: hca.name.clone(),
                        port: port.number,
                        up: track.up,
                        state: port.describe(),
                    });
                }
                seen.insert(key);
            }
        }
        // An HCA that vanished (driver unloaded) starts afresh when it comes back.
        self.tracks.retain(|k, _| seen.contains(k));
        changed
    }

    /// The port's reported state (unknown ports count as down).
    pub fn is_up(&self, hca: &str, port: u32) -> bool {
        self.tracks
            .get(&(hca.to_string(), port))
            .is_some_and(|t| t.up)
    }

    /// A port never up since we started that is `Disabled` or `Polling`: nobody plugged it in,
    /// so it is not news.
    pub fn is_unused(&self, hca: &str, port: &Port) -> bool {
        let ever_up = self
            .tracks
            .get(&(hca.to_string(), port.number))
            .is_some_and(|t| t.ever_up);
        !ever_up && port.is_unplugged()
    }

    /// When the earliest running hold-down ends: read the ports again then.
    pub fn deadline(&self) -> Option<Instant> {
        self.tracks
            .values()
            .filter_map(|t| t.down_since)
            .min()
            .map(|since| since + self.hold_down)
    }
}

/// The health of what a resource grants, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// The rule applied (`Ports` or `Nodes`).
    pub mode: Mode,
    /// Granted HCAs up (in `Ports` mode) and granted HCAs in all.
    pub up: usize,
    pub total: usize,
    /// `2 of 2 HCAs up`, `no uverbs node`, `--hcas nope* matches no HCA`, ...
    pub reason: String,
    /// The granted HCAs that are up, by name (per-HCA devices take their health from it). In
    /// `Nodes` mode: those with a `uverbs` node.
    pub up_hcas: Vec<String>,
}

/// Applies `mode` to what `grant` grants on `host`, with port states from `monitor`.
pub fn assess(host: &Host, grant: &Grant, mode: Mode, monitor: &PortMonitor) -> Health {
    let mode = mode.resolve(host);
    let total = grant.hcas.len();
    if let Some(problem) = &grant.problem {
        return Health {
            healthy: false,
            mode,
            up: 0,
            total,
            reason: problem.clone(),
            up_hcas: Vec::new(),
        };
    }
    let with_node = |name: &str| {
        grant
            .nodes
            .nodes
            .iter()
            .any(|n| n.kind == Kind::Uverbs && n.hca.as_deref() == Some(name))
    };
    if mode == Mode::Nodes {
        let verbs = grant
            .nodes
            .nodes
            .iter()
            .filter(|n| n.kind == Kind::Uverbs)
            .count();
        return Health {
            healthy: verbs > 0,
            mode,
            up: 0,
            total,
            reason: match verbs {
                0 => "no uverbs node".into(),
                n => format!("{n} uverbs node(s)"),
            },
            up_hcas: grant
                .hcas
                .iter()
                .filter(|h| with_node(h))
                .cloned()
                .collect(),
        };
    }
    if !host.hcas.described() {
        return Health {
            healthy: false,
            mode,
            up: 0,
            total,
            reason: "--health ports, but sysfs describes no HCA with ports".into(),
            up_hcas: Vec::new(),
        };
    }
    let mut up_hcas = Vec::new();
    let mut down = Vec::new();
    let mut degraded = Vec::new();
    for name in &grant.hcas {
        let Some(hca) = host.hcas.get(name) else {
            continue;
        };
        let has_node = with_node(name);
        // With --link-layer, only the ports of that layer count (a VPI HCA has both kinds).
        let ports: Vec<&Port> = hca
            .ports
            .iter()
            .filter(|p| p.counts_for(grant.link.as_ref()))
            .collect();
        // What sysfs cannot tell falls back to the nodes rule, for that HCA alone.
        let known: Vec<&&Port> = ports
            .iter()
            .filter(|p| p.state.is_some() && p.phys_state.is_some())
            .collect();
        if !has_node {
            down.push(format!("{name}: no uverbs node"));
            continue;
        }
        if known.is_empty() {
            up_hcas.push(name.clone());
            degraded.push(format!("{name}: port state unknown, uverbs node present"));
            continue;
        }
        let lost: Vec<String> = known
            .iter()
            .filter(|p| !monitor.is_up(name, p.number) && !monitor.is_unused(name, p))
            .map(|p| p.summary())
            .collect();
        if known.iter().any(|p| monitor.is_up(name, p.number)) {
            up_hcas.push(name.clone());
            if !lost.is_empty() {
                degraded.push(format!("{name}: {}", lost.join(", ")));
            }
        } else {
            let all: Vec<String> = known.iter().map(|p| p.summary()).collect();
            down.push(format!("{name}: {}", all.join(", ")));
        }
    }
    let up = up_hcas.len();
    let mut reason = format!("{up} of {total} HCAs up");
    if !degraded.is_empty() {
        reason.push_str(&format!("; degraded: {}", degraded.join("; ")));
    }
    if !down.is_empty() {
        reason.push_str(&format!("; down: {}", down.join("; ")));
    }
    Health {
        healthy: up > 0,
        mode,
        up,
        total,
        reason,
        up_hcas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::nodes::{DeviceNode, Inventory};
    use crate::host::select::Selector;
    use crate::host::sysfs::{Hca, Hcas, Status};
    use std::path::PathBuf;

    fn port(number: u32, (state, phys): ((u8, &str), (u8, &str))) -> Port {
        Port {
            number,
            state: Some(Status {
                code: state.0,
                text: state.1.into(),
            }),
            phys_state: Some(Status {
                code: phys.0,
                text: phys.1.into(),
            }),
            link_layer: None,
            rate: None,
        }
    }
    const UP: ((u8, &str), (u8, &str)) = ((4, "ACTIVE"), (5, "LinkUp"));
    const POLLING: ((u8, &str), (u8, &str)) = ((1, "DOWN"), (2, "Polling"));
    const DISABLED: ((u8, &str), (u8, &str)) = ((1, "DOWN"), (3, "Disabled"));

    /// A host whose HCAs `mlx5_<i>` have the given ports and a `uverbs<i>` node each.
    fn host(hcas: &[Vec<Port>]) -> Host {
        let mut h = Host {
            nodes: Inventory::default(),
            hcas: Hcas::default(),
        };
        for (i, ports) in hcas.iter().enumerate() {
            let name = format!("mlx5_{i}");
            h.nodes.nodes.push(DeviceNode {
                kind: Kind::Uverbs,
                host_path: PathBuf::from(format!("/dev/infiniband/uverbs{i}")),
                numa_node: None,
                hca: Some(name.clone()),
                dev: None,
            });
            h.hcas.list.push(Hca {
                name,
                ports: ports.clone(),
                ..Hca::default()
            });
        }
        h
    }

    fn health_of(h: &Host, m: &PortMonitor) -> Health {
        assess(
            h,
            &crate::host::grant(h, &Selector::default()),
            Mode::Auto,
            m,
        )
    }

    #[test]
    fn down_waits_for_the_hold_down_and_up_is_at_once() {
        let hold = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut m = PortMonitor::new(hold);
        let up = host(&[vec![port(1, UP)]]);
        let down = host(&[vec![port(1, POLLING)]]);
        assert!(m.observe(&up, t0).is_empty());
        assert!(health_of(&up, &m).healthy);

        // A flap shorter than the hold-down changes nothing.
        assert!(m.observe(&down, t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(6)));
        assert!(health_of(&down, &m).healthy);
        assert!(m.observe(&up, t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(m.deadline(), None);

        // Down for the whole hold-down: one transition, then Unhealthy.
        assert!(m.observe(&down, t0 + Duration::from_secs(10)).is_empty());
        let t = m.observe(&down, t0 + Duration::from_secs(15));
        assert_eq!(
            t,
            [Transition {
                hca: "mlx5_0".into(),
                port: 1,
                up: false,
                state: "DOWN (Polling)".into()
            }]
        );
        let h = health_of(&down, &m);
        assert!(!h.healthy);
        assert_eq!(
            h.reason,
            "0 of 1 HCAs up; down: mlx5_0: port 1 DOWN (Polling) ?"
        );
        assert!(m.observe(&down, t0 + Duration::from_secs(20)).is_empty());

        // Back up: at once.
        let t = m.observe(&up, t0 + Duration::from_secs(21));
        assert!(t.len() == 1 && t[0].up);
        assert!(health_of(&up, &m).healthy);
    }

    #[test]
    fn uncabled_ports_do_not_count_and_degraded_says_so() {
        let t0 = Instant::now();
        let mut m = PortMonitor::new(Duration::ZERO);
        let h = host(&[
            vec![port(1, UP), port(2, POLLING)],
            vec![port(1, UP), port(2, DISABLED)],
            vec![port(1, POLLING)],
        ]);
        assert!(m.observe(&h, t0).is_empty());
        let health = health_of(&h, &m);
        assert!(health.healthy);
        assert_eq!((health.up, health.total), (2, 3));
        assert!(
            health.reason.starts_with("2 of 3 HCAs up"),
            "{}",
            health.reason
        );
        // Uncabled ports neither degrade their HCA nor appear in the reason.
        assert_eq!(
            health.reason,
            "2 of 3 HCAs up; down: mlx5_2: port 1 DOWN (Polling) ?"
        );
        let p2 = &h.hcas.list[0].ports[1];
        assert!(m.is_unused("mlx5_0", p2));
        assert!(!m.is_unused("mlx5_0", &h.hcas.list[0].ports[0]));

        // A second port that was up and lost its cable degrades its HCA (still up).
        let both = host(&[vec![port(1, UP), port(2, UP)]]);
        let mut m = PortMonitor::new(Duration::ZERO);
        m.observe(&both, t0);
        let lost = host(&[vec![port(1, UP), port(2, POLLING)]]);
        assert_eq!(m.observe(&lost, t0).len(), 1);
        let health = health_of(&lost, &m);
        assert!(health.healthy);
        assert_eq!(
            health.reason,
            "1 of 1 HCAs up; degraded: mlx5_0: port 2 DOWN (Polling) ?"
        );
    }

    #[test]
    fn unknown_port_states_fall_back_to_the_node_and_link_filters_ports() {
        let t0 = Instant::now();
        let mut m = PortMonitor::new(Duration::ZERO);
        let mut unknown = port(1, UP);
        unknown.phys_state = None;
        let h = host(&[vec![unknown]]);
        m.observe(&h, t0);
        let health = health_of(&h, &m);
        assert!(health.healthy, "{health:?}");
        assert!(health
            .reason
            .contains("mlx5_0: port state unknown, uverbs node present"));

        // A VPI HCA: port 1 InfiniBand down, port 2 Ethernet up. With --link-layer infiniband
        // only port 1 counts.
        let mut ib = port(1, POLLING);
        ib.link_layer = Some(crate::host::sysfs::LinkLayer::InfiniBand);
        let mut eth = port(2, UP);
        eth.link_layer = Some(crate::host::sysfs::LinkLayer::Ethernet);
        let vpi = host(&[vec![ib, eth]]);
        m.observe(&vpi, t0);
        let sel = Selector {
            link: crate::host::select::LinkSelect::parse("infiniband").unwrap(),
            ..Selector::default()
        };
        let g = crate::host::grant(&vpi, &sel);
        assert!(!assess(&vpi, &g, Mode::Auto, &m).healthy);
        assert!(
            health_of(&vpi, &m).healthy,
            "without the filter port 2 counts"
        );
    }

    #[test]
    fn an_hca_without_its_uverbs_node_is_down_and_nodes_mode_ignores_ports() {
        let t0 = Instant::now();
        let mut m = PortMonitor::new(Duration::ZERO);
        let mut h = host(&[vec![port(1, UP)]]);
        h.nodes.nodes.clear();
        m.observe(&h, t0);
        let health = health_of(&h, &m);
        assert!(!health.healthy);
        assert!(
            health.reason.contains("mlx5_0: no uverbs node"),
            "{}",
            health.reason
        );

        let down = host(&[vec![port(1, POLLING)]]);
        m.observe(&down, t0);
        let g = crate::host::grant(&down, &Selector::default());
        let n = assess(&down, &g, Mode::Nodes, &m);
        assert!(n.healthy && n.mode == Mode::Nodes, "{n:?}");
        assert!(!assess(&down, &g, Mode::Ports, &m).healthy);
        assert_eq!(Mode::Auto.resolve(&Host::default()), Mode::Nodes);
        assert_eq!(Mode::Auto.resolve(&down), Mode::Ports);
    }
}
