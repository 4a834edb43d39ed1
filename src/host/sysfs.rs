//! The HCA inventory, read from sysfs with plain `std::fs` (layout: the kernel's
//! `Documentation/ABI/stable/sysfs-class-infiniband`, summed up in `shared/SYSFS.md`).
//!
//! Every HCA of `class/infiniband` with its ports, PCI function, NUMA node, netdevs, and the
//! device nodes sysfs says are its own (`class/infiniband_verbs`, `class/infiniband_mad`).
//! Nothing here is fatal: a missing tree reads as "no HCA described", a missing or unreadable
//! attribute as "unknown", each said once in [`Hcas::notes`] so callers can log it at debug.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::host::nodes::natural_cmp_str;

/// `class/infiniband` under the sysfs root: one symlink per HCA.
pub const CLASS_INFINIBAND: &str = "class/infiniband";
/// `class/infiniband_verbs`: one entry per `uverbs*` node, naming its HCA.
pub const CLASS_VERBS: &str = "class/infiniband_verbs";
/// `class/infiniband_mad`: one entry per `umad*`/`issm*` node (one per port).
pub const CLASS_MAD: &str = "class/infiniband_mad";
/// `Y`/`1`: every netns sees every HCA (shared); `N`/`0`: exclusive.
pub const NETNS_MODE: &str = "module/ib_core/parameters/netns_mode";
/// Bounds what we read from one attribute: sysfs attributes are a page at most.
const MAX_ATTR: u64 = 4096;

/// A `N: TEXT` attribute such as `4: ACTIVE` or `5: LinkUp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: u8,
    pub text: String,
}

impl Status {
    fn parse(raw: &str) -> Option<Status> {
        let (code, text) = raw.split_once(':')?;
        Some(Status {
            code: code.trim().parse().ok()?,
            text: text.trim().to_string(),
        })
    }
}

/// Logical port states (`ports/<n>/state`).
pub const STATE_ACTIVE: u8 = 4;
/// Physical port states (`ports/<n>/phys_state`).
pub const PHYS_POLLING: u8 = 2;
pub const PHYS_DISABLED: u8 = 3;
pub const PHYS_LINK_UP: u8 = 5;

/// `ports/<n>/link_layer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    InfiniBand,
    /// RoCE.
    Ethernet,
    Other(String),
}

impl LinkLayer {
    pub fn parse(raw: &str) -> LinkLayer {
        match raw.trim() {
            "InfiniBand" => LinkLayer::InfiniBand,
            "Ethernet" => LinkLayer::Ethernet,
            other => LinkLayer::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            LinkLayer::InfiniBand => "InfiniBand",
            LinkLayer::Ethernet => "Ethernet",
            LinkLayer::Other(s) => s,
        }
    }
}

/// One port of an HCA, numbered from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub number: u32,
    pub state: Option<Status>,
    pub phys_state: Option<Status>,
    pub link_layer: Option<LinkLayer>,
    pub rate: Option<String>,
}

impl Port {
    /// Up means what a verbs program needs: `ACTIVE` (a subnet manager configured it) over a
    /// physical `LinkUp`.
    pub fn is_up(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.code == STATE_ACTIVE)
            && self
                .phys_state
                .as_ref()
                .is_some_and(|s| s.code == PHYS_LINK_UP)
    }

    /// `Disabled`, or `Polling` (no cable or no peer): a port nobody meant to use, as long as it
    /// was never up (an uncabled second port).
    pub fn is_unplugged(&self) -> bool {
        self.phys_state
            .as_ref()
            .is_some_and(|s| s.code == PHYS_DISABLED || s.code == PHYS_POLLING)
    }

    /// Whether the port counts for a selection of link layer `link` (any, when `None`): with
    /// `--link-layer`, only the ports of that layer do (a VPI HCA has both kinds).
    pub fn counts_for(&self, link: Option<&LinkLayer>) -> bool {
        link.is_none_or(|l| self.link_layer.as_ref() == Some(l))
    }

    /// `port 1 ACTIVE (LinkUp) InfiniBand`, for logs and reports.
    pub fn summary(&self) -> String {
        let link = self.link_layer.as_ref().map_or("?", LinkLayer::as_str);
        format!("port {} {} {link}", self.number, self.describe())
    }

    /// `ACTIVE (LinkUp)`, `DOWN (Polling)`, `? (?)` for what could not be read.
    pub fn describe(&self) -> String {
        let text = |s: &Option<Status>| s.as_ref().map_or("?".to_string(), |s| s.text.clone());
        format!("{} ({})", text(&self.state), text(&self.phys_state))
    }
}

/// A character device's numbers, from a `dev` attribute (`231:192`) or `stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    pub fn parse(raw: &str) -> Option<DevNum> {
        let (major, minor) = raw.trim().split_once(':')?;
        Some(DevNum {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A device node sysfs attributes to an HCA: `uverbs3`, or `umad1` for port 2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// The node's name in `/dev/infiniband`.
    pub name: String,
    /// The HCA it belongs to (`ibdev`).
    pub hca: Option<String>,
    /// The port (`umad*`/`issm*` only).
    pub port: Option<u32>,
    pub dev: Option<DevNum>,
    /// The NUMA node of the PCI function behind it (`uverbs*` only; `device/numa_node`, -1 as
    /// unknown), so a node keeps its NUMA node when `class/infiniband` does not list its HCA.
    pub numa: Option<i64>,
}

/// The PCI function behind an HCA.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pci {
    /// `0000:3b:00.0`.
    pub address: String,
    /// The device path from the root complex down, e.g. `["pci0000:3a", "0000:3a:00.0",
    /// "0000:3b:00.0"]`: HCAs (and GPUs) that share a prefix share a root port or switch.
    pub path: Vec<String>,
    /// `None` when the platform does not say (`-1`).
    pub numa_node: Option<i64>,
    pub vendor: Option<u16>,
    pub device: Option<u16>,
    /// Where it was read (the resolved `device` link, inside sysfs's `devices/`).
    pub real: PathBuf,
}

/// One HCA of `class/infiniband`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hca {
    /// The kernel's name: `mlx5_0`, `irdma0`, `rxe0`, ...
    pub name: String,
    pub node_type: Option<String>,
    /// Stable across reboots and driver reloads.
    pub node_guid: Option<String>,
    pub fw_ver: Option<String>,
    pub hca_type: Option<String>,
    pub board_id: Option<String>,
    pub pci: Option<Pci>,
    pub ports: Vec<Port>,
    pub netdevs: Vec<String>,
    /// Its `uverbs*` nodes (usually one).
    pub verbs: Vec<NodeEntry>,
    /// Its `umad*` and `issm*` nodes (one each per port).
    pub mad: Vec<NodeEntry>,
}

impl Hca {
    pub fn numa_node(&self) -> Option<i64> {
        self.pci.as_ref().and_then(|p| p.numa_node)
    }

    /// True when any port uses `link` (a VPI HCA may have one of each).
    pub fn has_link_layer(&self, link: &LinkLayer) -> bool {
        self.ports
            .iter()
            .any(|p| p.link_layer.as_ref() == Some(link))
    }

    /// The link layers of its ports, de-duplicated, in port order (`InfiniBand`, `Ethernet`).
    pub fn link_layers(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.ports {
            if let Some(l) = &p.link_layer {
                if !out.contains(&l.as_str()) {
                    out.push(l.as_str());
                }
            }
        }
        out
    }
}

/// Everything sysfs says about the HCAs of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hcas {
    /// Sorted by name, naturally (`mlx5_2` before `mlx5_10`).
    pub list: Vec<Hca>,
    /// `uverbs*` entries whose HCA is not in `list` (a partial tree).
    pub orphans: Vec<NodeEntry>,
    /// What could not be read, one line each (for a debug log).
    pub notes: Vec<String>,
}

impl Hcas {
    /// True when sysfs describes at least one HCA with ports: port-state health needs it.
    pub fn described(&self) -> bool {
        self.list.iter().any(|h| !h.ports.is_empty())
    }

    /// Every `uverbs*`, `umad*` and `issm*` entry by name, whichever HCA it belongs to.
    pub fn entries(&self) -> std::collections::HashMap<&str, &NodeEntry> {
        self.list
            .iter()
            .flat_map(|h| h.verbs.iter().chain(&h.mad))
            .chain(&self.orphans)
            .map(|e| (e.name.as_str(), e))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Hca> {
        self.list.iter().find(|h| h.name == name)
    }
}

/// Reads the HCA inventory under `sysfs` (`/sys`, or a mock tree). Never fails: what cannot be
/// read is left unknown and noted.
pub fn read(sysfs: &Path) -> Hcas {
    let mut hcas = Hcas::default();
    let class = sysfs.join(CLASS_INFINIBAND);
    // PCI functions must resolve inside sysfs's own device tree: a `device` link elsewhere
    // (`/proc/self`, `/`) would make up a PCI address, NUMA node and netdevs.
    let devices = fs::canonicalize(sysfs.join("devices")).ok();
    for name in list_dir(&class, &mut hcas.notes) {
        // A dangling entry or a symlink loop is not an HCA.
        match fs::canonicalize(class.join(&name)) {
            Ok(real) if real.is_dir() => {
                let hca = read_hca(&real, &name, devices.as_deref(), &mut hcas.notes);
                hcas.list.push(hca);
            }
            Ok(_) => hcas
                .notes
                .push(format!("{}: not a directory", class.join(&name).display())),
            Err(e) => hcas
                .notes
                .push(format!("{}: {e}", class.join(&name).display())),
        }
    }
    hcas.list.sort_by(|a, b| natural_cmp_str(&a.name, &b.name));

    let verbs_dir = sysfs.join(CLASS_VERBS);
    for name in list_dir(&verbs_dir, &mut hcas.notes) {
        if !name.starts_with("uverbs") {
            continue;
        }
        let entry = read_node_entry(&verbs_dir.join(&name), name, false, &mut hcas.notes);
        match entry
            .hca
            .clone()
            .and_then(|h| hcas.list.iter_mut().find(|x| x.name == h))
        {
            Some(hca) => hca.verbs.push(entry),
            None => hcas.orphans.push(entry),
        }
    }
    let mad_dir = sysfs.join(CLASS_MAD);
    for name in list_dir(&mad_dir, &mut hcas.notes) {
        if !(name.starts_with("umad") || name.starts_with("issm")) {
            continue;
        }
        let entry = read_node_entry(&mad_dir.join(&name), name, true, &mut hcas.notes);
        match entry
            .hca
            .clone()
            .and_then(|h| hcas.list.iter_mut().find(|x| x.name == h))
        {
            Some(hca) => hca.mad.push(entry),
            None => hcas.orphans.push(entry),
        }
    }
    for hca in &mut hcas.list {
        hca.verbs.sort_by(|a, b| natural_cmp_str(&a.name, &b.name));
        hca.mad.sort_by(|a, b| natural_cmp_str(&a.name, &b.name));
    }
    hcas
}

/// The RDMA netns mode: `Some(true)` shared, `Some(false)` exclusive, `None` unknown (ib_core not
/// loaded, or no sysfs).
pub fn netns_shared(sysfs: &Path) -> Option<bool> {
    let raw = read_attr(&sysfs.join(NETNS_MODE)).ok()??;
    match raw.as_str() {
        "Y" | "1" => Some(true),
        "N" | "0" => Some(false),
        _ => None,
    }
}

fn read_hca(dir: &Path, name: &str, devices: Option<&Path>, notes: &mut Vec<String>) -> Hca {
    let mut hca = Hca {
        name: name.to_string(),
        node_type: attr(&dir.join("node_type"), notes),
        node_guid: attr(&dir.join("node_guid"), notes),
        fw_ver: attr(&dir.join("fw_ver"), notes),
        hca_type: attr(&dir.join("hca_type"), notes),
        board_id: attr(&dir.join("board_id"), notes),
        ..Hca::default()
    };
    hca.pci = read_pci(&dir.join("device"), devices, notes);
    let ports = dir.join("ports");
    let mut numbers: Vec<u32> = Vec::new();
    for n in list_dir(&ports, notes) {
        // Only the kernel's names: `1`, `2`, ... (`01` would list port 1 twice).
        match n.parse::<u32>() {
            Ok(v) if v > 0 && v.to_string() == n => numbers.push(v),
            _ => notes.push(format!("{}: not a port number: {n:?}", ports.display())),
        }
    }
    numbers.sort_unstable();
    for number in numbers {
        let p = ports.join(number.to_string());
        hca.ports.push(Port {
            number,
            state: attr(&p.join("state"), notes).and_then(|s| Status::parse(&s)),
            phys_state: attr(&p.join("phys_state"), notes).and_then(|s| Status::parse(&s)),
            link_layer: attr(&p.join("link_layer"), notes).map(|s| LinkLayer::parse(&s)),
            rate: attr(&p.join("rate"), notes),
        });
    }
    let net = hca.pci.as_ref().map(|p| p.real.join("net"));
    if let Some(net) = net.filter(|n| n.exists()) {
        let mut netdevs = list_dir(&net, notes);
        netdevs.sort_by(|a, b| natural_cmp_str(a, b));
        hca.netdevs = netdevs;
    }
    hca
}

/// The PCI function behind `device` (a symlink to it): its address, path, NUMA node and IDs.
fn read_pci(device: &Path, devices: Option<&Path>, notes: &mut Vec<String>) -> Option<Pci> {
    let real = match fs::canonicalize(device) {
        Ok(p) => p,
        Err(e) => {
            notes.push(format!("{}: {e}", device.display()));
            return None;
        }
    };
    if !devices.is_some_and(|d| real.starts_with(d) && real != d) {
        notes.push(format!(
            "{}: resolves to {}, outside sysfs's devices/",
            device.display(),
            real.display()
        ));
        return None;
    }
    let address = real.file_name()?.to_str()?.to_string();
    if address.chars().any(char::is_control) {
        notes.push(format!(
            "{}: control characters in the name",
            device.display()
        ));
        return None;
    }
    Some(Pci {
        path: pci_path(&real),
        numa_node: attr(&real.join("numa_node"), notes)
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|n| *n >= 0),
        vendor: attr(&real.join("vendor"), notes).and_then(|s| hex_u16(&s)),
        device: attr(&real.join("device"), notes).and_then(|s| hex_u16(&s)),
        address,
        real,
    })
}

/// The components from the root complex (`pci0000:3a`) down, from a resolved device path such as
/// `/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0`.
fn pci_path(real: &Path) -> Vec<String> {
    let parts: Vec<String> = real
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    match parts.iter().position(|p| p.starts_with("pci")) {
        Some(i) => parts[i..].to_vec(),
        None => parts.last().cloned().into_iter().collect(),
    }
}

fn read_node_entry(dir: &Path, name: String, mad: bool, notes: &mut Vec<String>) -> NodeEntry {
    NodeEntry {
        hca: attr(&dir.join("ibdev"), notes),
        port: if mad {
            attr(&dir.join("port"), notes).and_then(|s| s.parse().ok())
        } else {
            None
        },
        dev: attr(&dir.join("dev"), notes).and_then(|s| DevNum::parse(&s)),
        numa: if mad {
            None
        } else {
            attr(&dir.join("device/numa_node"), notes)
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
        },
        name,
    }
}

fn hex_u16(raw: &str) -> Option<u16> {
    let s = raw.trim();
    u16::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

/// Reads one sysfs attribute: a regular file (opened without blocking, so a FIFO in a hostile
/// tree cannot hang us), at most a page, trimmed, without control characters (values end up in
/// log lines and in what we tell the kubelet). `Ok(None)` when absent.
pub fn read_attr(path: &Path) -> io::Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut s = String::new();
    file.take(MAX_ATTR).read_to_string(&mut s)?;
    let s = s.trim();
    if s.chars().any(char::is_control) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control characters in the value",
        ));
    }
    Ok(Some(s.to_string()))
}

/// One attribute; `None` (noted unless simply absent) when it cannot be read.
fn attr(path: &Path, notes: &mut Vec<String>) -> Option<String> {
    match read_attr(path) {
        Ok(v) => v,
        Err(e) => {
            notes.push(format!("{}: {e}", path.display()));
            None
        }
    }
}

/// The UTF-8 entry names of a directory; absent reads as empty, other errors are noted.
fn list_dir(dir: &Path, notes: &mut Vec<String>) -> Vec<String> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            notes.push(format!("{}: {e}", dir.display()));
            return Vec::new();
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => match e.file_name().into_string() {
                Ok(n) if n.chars().any(char::is_control) => {
                    notes.push(format!("{}: skipping entry {n:?}", dir.display()));
                }
                Ok(n) => names.push(n),
                Err(n) => notes.push(format!("{}: non-UTF-8 entry {n:?}", dir.display())),
            },
            Err(e) => notes.push(format!("{}: {e}", dir.display())),
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::{self, MockHca, MockPort};
    use std::os::unix::fs::symlink;

    fn tree(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rdma-sysfs-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_hcas_ports_pci_and_nodes_through_symlinks() {
        let t = tree("full");
        let sys = t.join("sys");
        // uverbs numbers that do not match HCA numbers; a dual-port HCA with an uncabled port;
        // a RoCE NIC with NUMA -1.
        mock::add_hca(&sys, None, &MockHca::connectx(0).uverbs(3)).unwrap();
        mock::add_hca(
            &sys,
            None,
            &MockHca::connectx(1).uverbs(0).ports(vec![
                MockPort::ib(mock::ACTIVE),
                MockPort::ib(mock::DOWN_POLLING),
            ]),
        )
        .unwrap();
        mock::add_hca(&sys, None, &MockHca::roce(10).uverbs(1).numa(-1)).unwrap();
        mock::add_rdma_cm(&sys, None).unwrap();
        assert!(fs::symlink_metadata(sys.join("class/infiniband/mlx5_0"))
            .unwrap()
            .file_type()
            .is_symlink());

        let h = read(&sys);
        assert!(h.notes.is_empty(), "{:?}", h.notes);
        let names: Vec<&str> = h.list.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["mlx5_0", "mlx5_1", "mlx5_10"]);
        assert!(h.described());

        let a = &h.list[0];
        assert_eq!(a.verbs[0].name, "uverbs3");
        assert_eq!(
            a.verbs[0].dev,
            Some(DevNum {
                major: 231,
                minor: 195
            })
        );
        assert_eq!(a.node_guid.as_deref(), Some("0c42:a103:00c4:5e00"));
        let pci = a.pci.as_ref().unwrap();
        assert_eq!(pci.address, "0000:10:00.0");
        assert_eq!(pci.path, ["pci0000:0f", "0000:0f:00.0", "0000:10:00.0"]);
        assert_eq!((pci.vendor, pci.device), (Some(0x15b3), Some(0x101b)));
        assert_eq!(a.numa_node(), Some(0));
        assert_eq!(a.netdevs, ["ib0"]);
        assert_eq!(a.ports.len(), 1);
        assert!(a.ports[0].is_up());
        assert_eq!(a.ports[0].describe(), "ACTIVE (LinkUp)");
        assert_eq!(a.ports[0].link_layer, Some(LinkLayer::InfiniBand));
        let mad: Vec<&str> = a.mad.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(mad, ["issm0", "umad0"]);

        let b = &h.list[1];
        assert_eq!(b.ports.len(), 2);
        assert!(b.ports[0].is_up() && !b.ports[1].is_up());
        assert!(b.ports[1].is_unplugged());
        assert_eq!(b.mad.iter().filter(|e| e.port == Some(2)).count(), 2);

        let c = &h.list[2];
        assert_eq!(c.numa_node(), None);
        assert!(c.has_link_layer(&LinkLayer::Ethernet));
        assert_eq!(c.link_layers(), ["Ethernet"]);
        assert_eq!(c.verbs[0].name, "uverbs1");
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn partial_trees_degrade_to_unknown() {
        // No sysfs at all.
        let h = read(Path::new("/nonexistent/rdma-sys"));
        assert!(h.list.is_empty() && !h.described() && h.notes.is_empty());

        let t = tree("partial");
        let sys = t.join("sys");
        mock::add_hca(&sys, None, &MockHca::connectx(0)).unwrap();
        mock::add_hca(&sys, None, &MockHca::connectx(1)).unwrap();
        // mlx5_0 loses its ports/ (an HCA without ports), mlx5_1 an unreadable attribute (a
        // directory where a file should be) and its device link.
        let ib0 = fs::canonicalize(sys.join("class/infiniband/mlx5_0")).unwrap();
        fs::remove_dir_all(ib0.join("ports")).unwrap();
        let ib1 = fs::canonicalize(sys.join("class/infiniband/mlx5_1")).unwrap();
        fs::remove_file(ib1.join("node_guid")).unwrap();
        fs::create_dir(ib1.join("node_guid")).unwrap();
        fs::remove_file(ib1.join("device")).unwrap();
        // A uverbs entry naming an HCA sysfs does not list.
        mock::write(
            &sys.join("class/infiniband_verbs/uverbs9/ibdev"),
            "mlx5_9\n",
        )
        .unwrap();

        let h = read(&sys);
        assert_eq!(h.list.len(), 2);
        assert!(h.list[0].ports.is_empty());
        assert!(h.described(), "mlx5_1 still has ports");
        assert_eq!(h.list[1].node_guid, None);
        assert_eq!(h.list[1].pci, None);
        assert_eq!(h.list[1].numa_node(), None);
        assert_eq!(h.orphans[0].name, "uverbs9");
        assert!(
            h.notes.iter().any(|n| n.contains("node_guid")),
            "{:?}",
            h.notes
        );
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn hostile_trees_are_bounded_and_noted_never_trusted() {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let t = tree("hostile");
        let sys = t.join("sys");
        mock::add_hca(&sys, None, &MockHca::connectx(0)).unwrap();
        mock::add_hca(&sys, None, &MockHca::connectx(1)).unwrap();
        let ib0 = fs::canonicalize(sys.join("class/infiniband/mlx5_0")).unwrap();
        let ib1 = fs::canonicalize(sys.join("class/infiniband/mlx5_1")).unwrap();
        // A FIFO where an attribute should be: opening it must not block.
        let fifo = CString::new(ib0.join("ports/1/rate").as_os_str().as_bytes()).unwrap();
        fs::remove_file(ib0.join("ports/1/rate")).unwrap();
        // SAFETY (test): mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // A huge attribute is read a page at most; a value with control characters not at all.
        fs::write(ib0.join("fw_ver"), "9".repeat(1 << 20)).unwrap();
        fs::write(ib0.join("board_id"), "MT\x1b[2J\nforged").unwrap();
        // A port named `01` next to `1`, and one that is no number.
        fs::create_dir(ib0.join("ports/01")).unwrap();
        fs::create_dir(ib0.join("ports/abc")).unwrap();
        // mlx5_1's device link points outside sysfs.
        fs::remove_file(ib1.join("device")).unwrap();
        symlink("/proc/self", ib1.join("device")).unwrap();
        // A dangling class entry, a loop, and a name with a newline.
        symlink("../../devices/nowhere", sys.join("class/infiniband/ghost")).unwrap();
        symlink("loop", sys.join("class/infiniband/loop")).unwrap();
        symlink(
            fs::read_link(sys.join("class/infiniband/mlx5_0")).unwrap(),
            sys.join("class/infiniband/evil\n[ERROR] forged"),
        )
        .unwrap();

        let h = read(&sys);
        let names: Vec<&str> = h.list.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["mlx5_0", "mlx5_1"]);
        let a = &h.list[0];
        assert_eq!(a.ports.len(), 1, "01 and abc are not ports");
        assert_eq!(a.ports[0].rate, None);
        assert_eq!(a.fw_ver.as_ref().map(String::len), Some(MAX_ATTR as usize));
        assert_eq!(a.board_id, None);
        assert_eq!(
            h.list[1].pci, None,
            "a device link outside sysfs is not a PCI function"
        );
        assert!(h.list[1].netdevs.is_empty());
        let notes = h.notes.join("\n");
        for want in [
            "not a regular file",
            "control characters in the value",
            "not a port number: \"01\"",
            "outside sysfs's devices/",
            "ghost",
            "skipping entry \"evil\\n[ERROR] forged\"",
        ] {
            assert!(notes.contains(want), "missing {want:?} in {notes}");
        }
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn netns_mode() {
        let t = tree("netns");
        assert_eq!(netns_shared(&t), None);
        mock::set_netns_mode(&t, true).unwrap();
        assert_eq!(netns_shared(&t), Some(true));
        mock::set_netns_mode(&t, false).unwrap();
        assert_eq!(netns_shared(&t), Some(false));
        fs::remove_dir_all(&t).unwrap();
    }
}
