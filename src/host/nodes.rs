//! Finds the RDMA device nodes of a host with plain `std::fs` (never libibverbs, which broke on
//! mixed software/firmware revisions).
//!
//! Where nodes are *looked for* (`<root>/dev/infiniband`, `root` being `/` or a mount of the host's
//! `/` such as `/host`) is kept apart from the path *reported* to the kubelet, which is always the
//! host path (`/dev/infiniband/uverbs0`): the container runtime resolves it on the host.

use std::cmp::Ordering;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use log::debug;

use crate::host::sysfs::{read_attr, DevNum, Hcas};

/// The directory of verbs, CM and MAD nodes, relative to the host root.
pub const INFINIBAND_DIR: &str = "dev/infiniband";
/// The KNEM node (Open MPI / IBM MPI intra-node copies), relative to the host root.
pub const KNEM_NODE: &str = "dev/knem";

/// What a device node is for; the order of the variants is the order of the Allocate answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `uverbs*`: one per HCA port group, required for verbs.
    Uverbs,
    /// `rdma_cm`: the RDMA connection manager (optional).
    RdmaCm,
    /// `umad*`: MAD access for `ibstat`, `perfquery`, `ibnetdiscover` (with `--mad-devices`).
    Umad,
    /// `issm*`: the IsSM capability for subnet managers (with `--mad-devices`).
    Issm,
    /// `/dev/knem` (optional).
    Knem,
}

impl Kind {
    /// Classifies an entry name of `/dev/infiniband`; `None` for names we never pass. Only the
    /// kernel's exact names count (`uverbs` and digits, ...): a name with anything else in it
    /// (control characters included) can neither be granted nor reach a log line raw.
    fn of_infiniband_entry(name: &str) -> Option<Kind> {
        if name == "rdma_cm" {
            return Some(Kind::RdmaCm);
        }
        let numbered = |prefix: &str| {
            name.strip_prefix(prefix).is_some_and(|n| {
                !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit())
            })
        };
        if numbered("uverbs") {
            Some(Kind::Uverbs)
        } else if numbered("umad") {
            Some(Kind::Umad)
        } else if numbered("issm") {
            Some(Kind::Issm)
        } else {
            None
        }
    }

    fn is_mad(self) -> bool {
        matches!(self, Kind::Umad | Kind::Issm)
    }

    /// Where sysfs says what this node's major:minor is (`<class>/<name>/dev`).
    fn sysfs_dev(self, sysfs: &Path, name: &str) -> PathBuf {
        let class = match self {
            Kind::Uverbs => "class/infiniband_verbs",
            Kind::Umad | Kind::Issm => "class/infiniband_mad",
            Kind::RdmaCm | Kind::Knem => "class/misc",
        };
        sysfs.join(class).join(name).join("dev")
    }
}

/// One device node found on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceNode {
    pub kind: Kind,
    /// The path on the host, as reported to the kubelet, e.g. `/dev/infiniband/uverbs0`.
    pub host_path: PathBuf,
    /// The NUMA node of the HCA behind a `uverbs*` node, from sysfs; `None` when unknown.
    pub numa_node: Option<i64>,
    /// The HCA sysfs attributes a `uverbs*`, `umad*` or `issm*` node to (its `ibdev`);
    /// `None` for `rdma_cm`, `knem`, and nodes sysfs does not describe.
    pub hca: Option<String>,
    /// A character device's numbers, as verified against sysfs (what a CDI spec tells the
    /// runtime to create: never read again after the check); `None` for a plain file.
    pub dev: Option<DevNum>,
}

/// Everything discovery found, sorted: by kind, then in natural order within a kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub nodes: Vec<DeviceNode>,
    /// Entries named like device nodes that failed verification, with why (never granted).
    pub refused: Vec<Refused>,
}

/// An entry that looks like a device node but is not granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The host path, e.g. `/dev/infiniband/uverbs8`.
    pub host_path: String,
    pub why: String,
}

impl Inventory {
    /// Healthy means at least one `uverbs*` node: without one no verbs program can run.
    pub fn has_verbs(&self) -> bool {
        self.nodes.iter().any(|n| n.kind == Kind::Uverbs)
    }

    /// The NUMA nodes of all HCAs, sorted and de-duplicated; empty unless every `uverbs*` node
    /// has a known NUMA node (a partial answer would steer the Topology Manager wrongly).
    pub fn numa_nodes(&self) -> Vec<i64> {
        let verbs: Vec<Option<i64>> = self
            .nodes
            .iter()
            .filter(|n| n.kind == Kind::Uverbs)
            .map(|n| n.numa_node)
            .collect();
        if verbs.is_empty() || verbs.iter().any(Option::is_none) {
            return Vec::new();
        }
        let mut numa: Vec<i64> = verbs.into_iter().flatten().collect();
        numa.sort_unstable();
        numa.dedup();
        numa
    }
}

/// Which optional node families to pass besides `uverbs*`, `rdma_cm` and `knem`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Also pass `umad*` and `issm*` (MAD tools, subnet managers).
    pub mad: bool,
}

/// A discovery failure that is not simply "absent".
#[derive(Debug)]
pub enum Error {
    /// `<root>/dev/infiniband` exists but cannot be listed (permissions, not a directory, ...).
    ReadDir { path: PathBuf, source: io::Error },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ReadDir { path, source } => {
                write!(f, "cannot list {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::ReadDir { source, .. } => Some(source),
        }
    }
}

/// Lists the RDMA device nodes under `root` (`root/dev/...`). What sysfs says of each
/// `uverbs*`, `umad*` and `issm*` node (its HCA, NUMA node and device numbers) comes from
/// `hcas`, already read from `sysfs` (one reading of each sysfs entry per scan); only `rdma_cm`'s
/// and `knem`'s numbers are read here (`sysfs/class/misc`). An absent `dev/infiniband` or
/// `dev/knem` is not an error (no driver loaded yet); an unreadable one is.
pub fn scan(
    root: &Path,
    sysfs: &Path,
    hcas: &Hcas,
    selection: Selection,
) -> Result<Inventory, Error> {
    let mut inv = Inventory::default();
    scan_infiniband(root, sysfs, hcas, selection, &mut inv)?;
    let knem = root.join(KNEM_NODE);
    let host_path = Path::new("/").join(KNEM_NODE);
    let want = Want::read(Kind::Knem.sysfs_dev(sysfs, "knem"));
    match verify(&knem, None, &want) {
        Verified::Absent => {}
        Verified::Node(dev) => inv.nodes.push(DeviceNode {
            dev,
            kind: Kind::Knem,
            host_path,
            numa_node: None,
            hca: None,
        }),
        Verified::Refused(why) => refuse(&mut inv, &host_path, why),
    }
    Ok(inv)
}

fn refuse(inv: &mut Inventory, host_path: &Path, why: String) {
    let host_path = host_path.display().to_string();
    debug!("refusing {host_path}: {why}");
    inv.refused.push(Refused { host_path, why });
}

fn scan_infiniband(
    root: &Path,
    sysfs: &Path,
    hcas: &Hcas,
    selection: Selection,
    inv: &mut Inventory,
) -> Result<(), Error> {
    let described_by_sysfs = hcas.entries();
    let dir = root.join(INFINIBAND_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            debug!("{} is absent: no RDMA driver loaded", dir.display());
            return Ok(());
        }
        Err(source) => return Err(Error::ReadDir { path: dir, source }),
    };
    for entry in entries {
        let entry = entry.map_err(|source| Error::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let os_name = entry.file_name();
        let Some((name, kind)) = os_name
            .to_str()
            .and_then(|n| Kind::of_infiniband_entry(n).map(|k| (n, k)))
        else {
            // Debug-quoted: a crafted name cannot forge log lines.
            log::trace!("skipping {os_name:?}: not an RDMA node name we pass");
            continue;
        };
        if kind.is_mad() && !selection.mad {
            // Every health reading scans: trace, not debug, to keep debug logs readable.
            log::trace!("skipping {name}: MAD nodes are passed only with --mad-devices");
            continue;
        }
        let host_path = Path::new("/").join(INFINIBAND_DIR).join(name);
        // The entry's type comes with the listing (d_type): no stat per plain file, except to
        // follow a symlink or on filesystems that do not report types.
        let known = entry.file_type().ok();
        let described = described_by_sysfs.get(name).copied();
        // A node the sysfs reading does not name (rdma_cm; or one that appeared between that
        // reading and this listing, a hot-plug) has its numbers read now.
        let want = match described.and_then(|e| e.dev) {
            Some(dev) => Want::Known {
                dev: Some(dev),
                path: kind.sysfs_dev(sysfs, name),
            },
            None => Want::read(kind.sysfs_dev(sysfs, name)),
        };
        let dev = match verify(&entry.path(), known, &want) {
            Verified::Absent => continue,
            Verified::Refused(why) => {
                refuse(inv, &host_path, why);
                continue;
            }
            Verified::Node(dev) => dev,
        };
        let numa_node = described.and_then(|e| e.numa);
        let hca = described
            .and_then(|e| e.hca.clone())
            .filter(|h| !h.is_empty());
        inv.nodes.push(DeviceNode {
            kind,
            host_path,
            numa_node,
            hca,
            dev,
        });
    }
    inv.nodes.sort_by(|a, b| {
        a.kind
            .cmp(&b.kind)
            .then_with(|| natural_cmp(&a.host_path, &b.host_path))
    });
    inv.refused
        .sort_by(|a, b| natural_cmp_str(&a.host_path, &b.host_path));
    Ok(())
}

/// The device numbers sysfs gives a node: already read (with where from, for messages), or to
/// be read from a `dev` attribute only if the node turns out to be a character device.
enum Want {
    Known { dev: Option<DevNum>, path: PathBuf },
    Read(PathBuf),
}

impl Want {
    fn read(path: PathBuf) -> Want {
        Want::Read(path)
    }

    fn get(&self) -> (Option<DevNum>, &Path) {
        match self {
            Want::Known { dev, path } => (*dev, path),
            Want::Read(path) => (
                read_attr(path)
                    .ok()
                    .flatten()
                    .and_then(|s| DevNum::parse(&s)),
                path,
            ),
        }
    }
}

enum Verified {
    /// To be granted; a character device's verified numbers.
    Node(Option<DevNum>),
    Absent,
    Refused(String),
}

/// The runtime creates in the pod whatever device the host path finally names, so this is the
/// last check. A **character device** is granted only when sysfs names that node with the same
/// major:minor (`sysfs_dev`). A **regular file** is granted as a stand-in (mock trees, the
/// original's `docker run` check): a runtime cannot make a device of it. A **symlink** is
/// followed only to a plain name in its own directory (never `../`, never absolute: those would
/// be resolved in our mount namespace, not the host's), one hop, and what it names is checked
/// against the link's own name. Anything else (a directory, which a runtime leaves at a hostPath
/// of a missing file; a FIFO; a socket) is refused.
fn verify(path: &Path, known: Option<fs::FileType>, sysfs_dev: &Want) -> Verified {
    // A plain file from d_type needs no stat; everything else does.
    if known.is_some_and(|t| t.is_file()) {
        return Verified::Node(None);
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Verified::Absent,
        Err(e) => return Verified::Refused(format!("cannot stat: {e}")),
    };
    if !meta.file_type().is_symlink() {
        return check_type(&meta, sysfs_dev);
    }
    let target = match fs::read_link(path) {
        Ok(t) => t,
        Err(e) => return Verified::Refused(format!("cannot read the symlink: {e}")),
    };
    let mut parts = target.components();
    let plain = matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    );
    let Some(dir) = path.parent().filter(|_| plain) else {
        return Verified::Refused(format!(
            "a symlink to {:?}, outside its directory",
            target.display().to_string()
        ));
    };
    match fs::symlink_metadata(dir.join(&target)) {
        Ok(m) if m.file_type().is_symlink() => Verified::Refused("a symlink to a symlink".into()),
        Ok(m) => check_type(&m, sysfs_dev),
        // A dangling link: nothing there (yet).
        Err(e) if e.kind() == io::ErrorKind::NotFound => Verified::Absent,
        Err(e) => Verified::Refused(format!("cannot stat the link's target: {e}")),
    }
}

fn check_type(meta: &fs::Metadata, sysfs_dev: &Want) -> Verified {
    let ftype = meta.file_type();
    if ftype.is_file() {
        return Verified::Node(None);
    }
    if !ftype.is_char_device() {
        return Verified::Refused("neither a character device nor a file".into());
    }
    let have = DevNum {
        major: libc::major(meta.rdev()),
        minor: libc::minor(meta.rdev()),
    };
    let (want, sysfs_dev) = sysfs_dev.get();
    match want {
        Some(w) if w == have => Verified::Node(Some(have)),
        Some(w) => Verified::Refused(format!(
            "a character device {have}, but sysfs says {w} ({})",
            sysfs_dev.display()
        )),
        None => Verified::Refused(format!(
            "a character device {have} that sysfs does not describe ({} unreadable)",
            sysfs_dev.display()
        )),
    }
}

/// Orders `uverbs2` before `uverbs10`: digit runs compare by value, the rest byte-wise.
pub fn natural_cmp(a: &Path, b: &Path) -> Ordering {
    natural_cmp_str(&a.to_string_lossy(), &b.to_string_lossy())
}

/// [`natural_cmp`] on strings; also orders device IDs (`rdma-2` before `rdma-10`).
pub fn natural_cmp_str(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let first = digits
        .iter()
        .position(|&c| c != b'0')
        .unwrap_or(digits.len());
    &digits[first..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `root` as the daemon does: sysfs (`root/sys`) read first, then the nodes.
    fn scan_tree(root: &Path, selection: Selection) -> Result<Inventory, Error> {
        let sysfs = root.join("sys");
        scan(root, &sysfs, &crate::host::sysfs::read(&sysfs), selection)
    }

    /// A temp tree that removes itself; one per test so tests run in parallel.
    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "rdma-disc-{}-{}-{tag}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            Tree(dir)
        }
        fn file(&self, rel: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"").unwrap();
        }
        fn dir(&self, rel: &str) {
            fs::create_dir_all(self.0.join(rel)).unwrap();
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn paths(inv: &Inventory) -> Vec<String> {
        inv.nodes
            .iter()
            .map(|n| n.host_path.display().to_string())
            .collect()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            files: &'static [&'static str],
            dirs: &'static [&'static str],
            mad: bool,
            want: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "absent /dev/infiniband",
                files: &[],
                dirs: &["dev"],
                mad: false,
                want: &[],
            },
            Case {
                name: "empty /dev/infiniband",
                files: &[],
                dirs: &["dev/infiniband"],
                mad: false,
                want: &[],
            },
            Case {
                name: "one HCA with rdma_cm and knem",
                files: &[
                    "dev/infiniband/uverbs0",
                    "dev/infiniband/rdma_cm",
                    "dev/knem",
                ],
                dirs: &[],
                mad: false,
                want: &[
                    "/dev/infiniband/uverbs0",
                    "/dev/infiniband/rdma_cm",
                    "/dev/knem",
                ],
            },
            Case {
                name: "natural order",
                files: &[
                    "dev/infiniband/uverbs10",
                    "dev/infiniband/uverbs2",
                    "dev/infiniband/uverbs1",
                ],
                dirs: &[],
                mad: false,
                want: &[
                    "/dev/infiniband/uverbs1",
                    "/dev/infiniband/uverbs2",
                    "/dev/infiniband/uverbs10",
                ],
            },
            Case {
                name: "directory at a device path (hostPath of a missing file)",
                files: &["dev/infiniband/uverbs0"],
                dirs: &[
                    "dev/knem",
                    "dev/infiniband/uverbs1",
                    "dev/infiniband/rdma_cm",
                ],
                mad: false,
                want: &["/dev/infiniband/uverbs0"],
            },
            Case {
                name: "odd names are ignored",
                files: &[
                    "dev/infiniband/uverbs0",
                    "dev/infiniband/xuverbs1",
                    "dev/infiniband/rdma_cm0",
                    "dev/infiniband/README",
                    "dev/knem0",
                ],
                dirs: &[],
                mad: false,
                want: &["/dev/infiniband/uverbs0"],
            },
            Case {
                name: "MAD nodes only when selected",
                files: &[
                    "dev/infiniband/uverbs0",
                    "dev/infiniband/umad0",
                    "dev/infiniband/issm0",
                ],
                dirs: &[],
                mad: false,
                want: &["/dev/infiniband/uverbs0"],
            },
            Case {
                name: "MAD nodes selected",
                files: &[
                    "dev/infiniband/issm0",
                    "dev/infiniband/umad1",
                    "dev/infiniband/umad0",
                    "dev/infiniband/uverbs0",
                    "dev/infiniband/rdma_cm",
                ],
                dirs: &[],
                mad: true,
                want: &[
                    "/dev/infiniband/uverbs0",
                    "/dev/infiniband/rdma_cm",
                    "/dev/infiniband/umad0",
                    "/dev/infiniband/umad1",
                    "/dev/infiniband/issm0",
                ],
            },
            Case {
                name: "knem without an HCA",
                files: &["dev/knem"],
                dirs: &["dev/infiniband"],
                mad: false,
                want: &["/dev/knem"],
            },
        ];
        for case in cases {
            let tree = Tree::new("table");
            for d in case.dirs {
                tree.dir(d);
            }
            for f in case.files {
                tree.file(f);
            }
            let inv = scan_tree(&tree.0, Selection { mad: case.mad }).unwrap();
            assert_eq!(paths(&inv), case.want, "case: {}", case.name);
            assert_eq!(
                inv.has_verbs(),
                case.want.iter().any(|p| p.contains("uverbs")),
                "health of case: {}",
                case.name
            );
        }
    }

    #[test]
    fn symlinks_stay_in_their_directory() {
        let tree = Tree::new("links");
        tree.file("dev/real/uverbs7");
        tree.file("dev/infiniband/target3");
        tree.dir("dev/infiniband");
        let ib = tree.0.join(INFINIBAND_DIR);
        let link = |to: &str, name: &str| std::os::unix::fs::symlink(to, ib.join(name)).unwrap();
        link("target3", "uverbs3"); // a plain name in the same directory: followed
        link("missing", "uverbs4"); // dangling: absent, not refused
        link("../real/uverbs7", "uverbs0"); // leaves the directory
        link("/etc/passwd", "uverbs1"); // absolute: would resolve in our namespace
        link("uverbs3", "uverbs2"); // a link to a link
        link("../../etc", "rdma_cm");
        let inv = scan_tree(&tree.0, Selection::default()).unwrap();
        assert_eq!(paths(&inv), ["/dev/infiniband/uverbs3"]);
        let refused: Vec<(&str, &str)> = inv
            .refused
            .iter()
            .map(|r| (r.host_path.as_str(), r.why.as_str()))
            .collect();
        assert_eq!(
            refused,
            [
                (
                    "/dev/infiniband/rdma_cm",
                    "a symlink to \"../../etc\", outside its directory"
                ),
                (
                    "/dev/infiniband/uverbs0",
                    "a symlink to \"../real/uverbs7\", outside its directory"
                ),
                (
                    "/dev/infiniband/uverbs1",
                    "a symlink to \"/etc/passwd\", outside its directory"
                ),
                ("/dev/infiniband/uverbs2", "a symlink to a symlink"),
            ]
        );
    }

    #[test]
    fn only_the_kernels_names_count() {
        let tree = Tree::new("names");
        for name in [
            "uverbs0",
            "uverbs1\nFAKE log line",
            "uverbs",
            "uverbs-1",
            "uverbs01x",
            "umad0",
            "umadx",
            "issm1",
            "rdma_cm2",
            "uverbs1234567",
        ] {
            tree.file(&format!("dev/infiniband/{name}"));
        }
        let inv = scan_tree(&tree.0, Selection { mad: true }).unwrap();
        assert_eq!(
            paths(&inv),
            [
                "/dev/infiniband/uverbs0",
                "/dev/infiniband/umad0",
                "/dev/infiniband/issm1"
            ]
        );
        assert!(inv.refused.is_empty(), "not ours: skipped, not refused");
    }

    #[test]
    fn character_devices_must_match_sysfs() {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let tree = Tree::new("chardev");
        tree.dir("dev/infiniband");
        let mknod = |rel: &str, major: u32, minor: u32| {
            crate::sys::make_char_device(&tree.0.join(rel), major, minor).is_ok()
        };
        if !mknod("dev/infiniband/uverbs0", 231, 192) {
            eprintln!("mknod not permitted here (not root): skipping");
            return;
        }
        tree.write("sys/class/infiniband_verbs/uverbs0/dev", "231:192\n");
        // The numbers of /dev/mem under a verbs name.
        assert!(mknod("dev/infiniband/uverbs8", 1, 1));
        tree.write("sys/class/infiniband_verbs/uverbs8/dev", "231:200\n");
        // No sysfs entry to compare with.
        assert!(mknod("dev/infiniband/uverbs9", 231, 201));
        // /dev/knem as a link to /dev/mem's node; rdma_cm right.
        assert!(mknod("dev/mem", 1, 1));
        std::os::unix::fs::symlink("mem", tree.0.join("dev/knem")).unwrap();
        tree.write("sys/class/misc/knem/dev", "10:60\n");
        assert!(mknod("dev/infiniband/rdma_cm", 10, 58));
        tree.write("sys/class/misc/rdma_cm/dev", "10:58\n");
        // A FIFO under a verbs name.
        let fifo =
            CString::new(tree.0.join("dev/infiniband/uverbs5").as_os_str().as_bytes()).unwrap();
        // SAFETY (test): mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let inv = scan_tree(&tree.0, Selection::default()).unwrap();
        assert_eq!(
            paths(&inv),
            ["/dev/infiniband/uverbs0", "/dev/infiniband/rdma_cm"]
        );
        let why = |p: &str| {
            inv.refused
                .iter()
                .find(|r| r.host_path == p)
                .map(|r| r.why.clone())
                .unwrap_or_default()
        };
        assert!(why("/dev/infiniband/uverbs8")
            .starts_with("a character device 1:1, but sysfs says 231:200"));
        assert!(why("/dev/infiniband/uverbs9").contains("that sysfs does not describe"));
        assert!(why("/dev/knem").starts_with("a character device 1:1, but sysfs says 10:60"));
        assert_eq!(
            why("/dev/infiniband/uverbs5"),
            "neither a character device nor a file"
        );

        // A node hot-plugged after the sysfs reading (the kernel adds sysfs first, then the
        // node): its numbers are read when it is listed, not refused for want of an entry.
        let sysfs = tree.0.join("sys");
        let before = crate::host::sysfs::read(&sysfs);
        assert!(mknod("dev/infiniband/uverbs1", 231, 193));
        tree.write("sys/class/infiniband_verbs/uverbs1/dev", "231:193\n");
        let inv = scan(&tree.0, &sysfs, &before, Selection::default()).unwrap();
        assert!(
            paths(&inv).contains(&"/dev/infiniband/uverbs1".to_string()),
            "{:?}",
            inv.refused
        );
    }

    #[test]
    fn root_absent_is_empty_not_error() {
        let inv = scan_tree(Path::new("/nonexistent/rdma-root"), Selection::default()).unwrap();
        assert!(inv.nodes.is_empty());
    }

    #[test]
    fn file_where_directory_should_be_is_an_error() {
        let tree = Tree::new("file-dir");
        tree.file("dev/infiniband");
        let err = scan_tree(&tree.0, Selection::default()).unwrap_err();
        assert!(err.to_string().contains("dev/infiniband"), "{err}");
    }

    #[test]
    fn symlink_loop_is_an_error() {
        // ELOOP stands for every "exists but cannot be listed" case, and unlike a permission
        // check it also fails for root, which CI runs as.
        let tree = Tree::new("loop");
        tree.dir("dev");
        std::os::unix::fs::symlink("infiniband", tree.0.join(INFINIBAND_DIR)).unwrap();
        let err = scan_tree(&tree.0, Selection::default()).unwrap_err();
        assert!(err.to_string().contains("cannot list"), "{err}");
    }

    #[test]
    fn numa_nodes_from_sysfs() {
        let tree = Tree::new("numa");
        tree.file("dev/infiniband/uverbs0");
        tree.file("dev/infiniband/uverbs1");
        tree.write("sys/class/infiniband_verbs/uverbs0/device/numa_node", "1\n");
        tree.write("sys/class/infiniband_verbs/uverbs1/device/numa_node", "0\n");
        let inv = scan_tree(&tree.0, Selection::default()).unwrap();
        assert_eq!(inv.numa_nodes(), vec![0, 1]);

        // One HCA with an unknown node (-1) makes the whole answer unknown.
        tree.write(
            "sys/class/infiniband_verbs/uverbs1/device/numa_node",
            "-1\n",
        );
        let inv = scan_tree(&tree.0, Selection::default()).unwrap();
        assert_eq!(inv.numa_nodes(), Vec::<i64>::new());
    }

    #[test]
    fn natural_order_of_strings() {
        let mut v = vec!["rdma-10", "rdma-2", "rdma-1", "a", "rdma-", "rdma-9x"];
        v.sort_by(|a, b| natural_cmp_str(a, b));
        assert_eq!(v, ["a", "rdma-", "rdma-1", "rdma-2", "rdma-9x", "rdma-10"]);
    }
}
