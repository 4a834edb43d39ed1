//! Mock host trees laid out as the kernel lays them out (`shared/SYSFS.md`), symlinks included,
//! so production code reads them through the same paths and links it reads on a real node. Used
//! by the unit tests, the integration tests, the demo and the benchmark; plain `std::fs`.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// One port of a mock HCA.
#[derive(Clone, Debug)]
pub struct MockPort {
    /// `4: ACTIVE`, `1: DOWN`, ...
    pub state: &'static str,
    /// `5: LinkUp`, `2: Polling`, ...
    pub phys_state: &'static str,
    /// `InfiniBand` or `Ethernet`.
    pub link_layer: &'static str,
}

pub const ACTIVE: (&str, &str) = ("4: ACTIVE", "5: LinkUp");
pub const DOWN_POLLING: (&str, &str) = ("1: DOWN", "2: Polling");
pub const DOWN_DISABLED: (&str, &str) = ("1: DOWN", "3: Disabled");
pub const INIT: (&str, &str) = ("2: INIT", "5: LinkUp");

impl MockPort {
    pub fn ib((state, phys_state): (&'static str, &'static str)) -> MockPort {
        MockPort {
            state,
            phys_state,
            link_layer: "InfiniBand",
        }
    }
    pub fn eth((state, phys_state): (&'static str, &'static str)) -> MockPort {
        MockPort {
            state,
            phys_state,
            link_layer: "Ethernet",
        }
    }
}

/// One mock HCA and the nodes sysfs attributes to it.
#[derive(Clone, Debug)]
pub struct MockHca {
    pub name: String,
    /// `pci0000:3a`.
    pub root_complex: String,
    /// Bridges between the root complex and the function: root port, switch ports.
    pub bridges: Vec<String>,
    /// `0000:3b:00.0`.
    pub pci: String,
    /// Written as is, so `-1` (platform does not say) can be mocked.
    pub numa: i64,
    pub vendor: u16,
    pub device: u16,
    pub guid: String,
    pub ports: Vec<MockPort>,
    pub netdevs: Vec<String>,
    /// `N` of `uverbsN`; need not match the HCA's number.
    pub uverbs: u32,
    /// `N` of the first `umadN`/`issmN`; one per port from there.
    pub umad: u32,
}

impl MockHca {
    /// A ConnectX-6 (`15b3:101b`) InfiniBand HCA `mlx5_<n>`, one ACTIVE port, `uverbs<n>`,
    /// under root port `0000:<bus-1>:00.0` of root complex `pci0000:<bus-1>`, NUMA node 0.
    pub fn connectx(n: u32) -> MockHca {
        let bus = 0x10 + 2 * n;
        MockHca {
            name: format!("mlx5_{n}"),
            root_complex: format!("pci0000:{:02x}", bus - 1),
            bridges: vec![format!("0000:{:02x}:00.0", bus - 1)],
            pci: format!("0000:{bus:02x}:00.0"),
            numa: 0,
            vendor: 0x15b3,
            device: 0x101b,
            guid: format!("0c42:a103:00c4:{:04x}", 0x5e00 + n),
            ports: vec![MockPort::ib(ACTIVE)],
            netdevs: vec![format!("ib{n}")],
            uverbs: n,
            umad: n * 2,
        }
    }

    pub fn ports(mut self, ports: Vec<MockPort>) -> MockHca {
        self.ports = ports;
        self
    }

    pub fn numa(mut self, numa: i64) -> MockHca {
        self.numa = numa;
        self
    }

    pub fn uverbs(mut self, n: u32) -> MockHca {
        self.uverbs = n;
        self
    }

    pub fn netdevs(mut self, netdevs: &[&str]) -> MockHca {
        self.netdevs = netdevs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// A RoCE NIC: Ethernet ports, a ConnectX-6 Dx (`15b3:101d`), an Ethernet netdev.
    pub fn roce(n: u32) -> MockHca {
        let mut h = MockHca::connectx(n);
        h.device = 0x101d;
        h.ports = vec![MockPort::eth(ACTIVE)];
        h.netdevs = vec![format!("enp{}s0f0np0", 0x10 + 2 * n)];
        h
    }

    /// The PCI function's directory, relative to the sysfs root.
    fn pci_rel(&self) -> PathBuf {
        let mut p = PathBuf::from("devices").join(&self.root_complex);
        for b in &self.bridges {
            p.push(b);
        }
        p.join(&self.pci)
    }
}

/// Writes `text` to `path`, creating its parent directories.
pub fn write(path: &Path, text: &str) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, text)
}

/// `ln -s target link`, creating the link's parent directories.
fn link(target: &Path, link: &Path) -> io::Result<()> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent)?;
    }
    symlink(target, link)
}

/// "../" repeated for each component of `rel`'s parent: the way back to the sysfs root.
fn up_from(rel: &Path) -> PathBuf {
    let depth = rel.components().count().saturating_sub(1);
    (0..depth).map(|_| "..").collect()
}

/// Adds `hca` to the sysfs tree at `sys`, as the kernel shows it: the PCI function under
/// `devices/`, `class/infiniband/<name>` and `class/infiniband_{verbs,mad}/*` as symlinks into
/// it, each with a `device` link back to the function. `dev` (optional) is the host's `/dev`
/// directory, where plain files stand in for the HCA's `uverbs`, `umad` and `issm` nodes.
pub fn add_hca(sys: &Path, dev: Option<&Path>, hca: &MockHca) -> io::Result<()> {
    let pci_rel = hca.pci_rel();
    let pci = sys.join(&pci_rel);
    write(&pci.join("numa_node"), &format!("{}\n", hca.numa))?;
    write(&pci.join("vendor"), &format!("0x{:04x}\n", hca.vendor))?;
    write(&pci.join("device"), &format!("0x{:04x}\n", hca.device))?;
    for n in &hca.netdevs {
        write(&pci.join("net").join(n).join("operstate"), "up\n")?;
    }

    // devices/.../<pci>/infiniband/<name>, linked from class/infiniband/<name>.
    let ib_rel = pci_rel.join("infiniband").join(&hca.name);
    let ib = sys.join(&ib_rel);
    write(&ib.join("node_type"), "1: CA\n")?;
    write(&ib.join("node_guid"), &format!("{}\n", hca.guid))?;
    write(&ib.join("fw_ver"), "20.39.1002\n")?;
    write(&ib.join("hca_type"), "MT4123\n")?;
    write(&ib.join("board_id"), "MT_0000000223\n")?;
    link(&Path::new("../../..").join(&hca.pci), &ib.join("device"))?;
    for (i, p) in hca.ports.iter().enumerate() {
        let dir = ib.join("ports").join((i + 1).to_string());
        write(&dir.join("state"), &format!("{}\n", p.state))?;
        write(&dir.join("phys_state"), &format!("{}\n", p.phys_state))?;
        write(&dir.join("link_layer"), &format!("{}\n", p.link_layer))?;
        write(&dir.join("rate"), "200 Gb/sec (4X HDR)\n")?;
    }
    let class_link = Path::new("class/infiniband").join(&hca.name);
    link(&up_from(&class_link).join(&ib_rel), &sys.join(&class_link))?;

    let mut nodes = vec![(
        "infiniband_verbs",
        format!("uverbs{}", hca.uverbs),
        None,
        192 + hca.uverbs,
    )];
    for port in 1..=hca.ports.len() as u32 {
        let n = hca.umad + port - 1;
        nodes.push(("infiniband_mad", format!("umad{n}"), Some(port), n));
        nodes.push(("infiniband_mad", format!("issm{n}"), Some(port), 64 + n));
    }
    for (class, name, port, minor) in nodes {
        let rel = pci_rel.join(class).join(&name);
        let dir = sys.join(&rel);
        write(&dir.join("ibdev"), &format!("{}\n", hca.name))?;
        write(&dir.join("dev"), &format!("231:{minor}\n"))?;
        if let Some(port) = port {
            write(&dir.join("port"), &format!("{port}\n"))?;
        }
        link(&Path::new("../../..").join(&hca.pci), &dir.join("device"))?;
        let class_link = Path::new("class").join(class).join(&name);
        link(&up_from(&class_link).join(&rel), &sys.join(&class_link))?;
        if let Some(dev) = dev {
            write(&dev.join("infiniband").join(&name), "")?;
        }
    }
    Ok(())
}

/// `class/misc/rdma_cm` (and the node under `dev`, when given).
pub fn add_rdma_cm(sys: &Path, dev: Option<&Path>) -> io::Result<()> {
    write(&sys.join("devices/virtual/misc/rdma_cm/dev"), "10:58\n")?;
    link(
        Path::new("../../devices/virtual/misc/rdma_cm"),
        &sys.join("class/misc/rdma_cm"),
    )?;
    if let Some(dev) = dev {
        write(&dev.join("infiniband/rdma_cm"), "")?;
    }
    Ok(())
}

/// Sets port `port` (from 1) of `hca` to `state`/`phys_state`, as the kernel would.
pub fn set_port(sys: &Path, hca: &str, port: u32, (state, phys): (&str, &str)) -> io::Result<()> {
    let dir = sys
        .join("class/infiniband")
        .join(hca)
        .join("ports")
        .join(port.to_string());
    // Rename over the old file so a concurrent reader sees the old or the new value, never a
    // half-written one (the kernel's attributes are atomic too).
    for (file, text) in [("state", state), ("phys_state", phys)] {
        let tmp = dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, format!("{text}\n"))?;
        fs::rename(&tmp, dir.join(file))?;
    }
    Ok(())
}

/// Sets `module/ib_core/parameters/netns_mode`.
pub fn set_netns_mode(sys: &Path, shared: bool) -> io::Result<()> {
    write(
        &sys.join("module/ib_core/parameters/netns_mode"),
        if shared { "Y\n" } else { "N\n" },
    )
}
