//! CDI (Container Device Interface) specs, opt-in with `--cdi`: one JSON spec per resource in
//! the spec directory (`/var/run/cdi`), kind = the resource name, one CDI device per advertised
//! device ID listing its device nodes (with type, major and minor where the node is a character
//! device). Allocate then answers with the fully qualified CDI names
//! (`jarvice.com/rdma=rdma-0`), which the runtime resolves (containerd 2.0 and CRI-O have CDI
//! on by default; Kubernetes 1.31+ passes `cdi_devices`), and with the device specs too unless
//! `--cdi-only`, because a runtime without CDI drops the names without a word.
//!
//! Here: what a spec says and how it is written (atomically: a temp file renamed over it, so no
//! runtime reads half a spec). The daemon keeps it as it must be ([`crate::daemon::cdi_spec`]).

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::host::nodes::DeviceNode;
use crate::tools::json::quote;

/// The CDI specification version we write: 0.6.0 added what we use (device node type, major,
/// minor, permissions) long ago, and every CDI-aware runtime reads it.
pub const CDI_VERSION: &str = "0.6.0";

/// One CDI device: its name (our device ID), nodes and envs.
pub struct CdiDevice<'a> {
    pub name: String,
    pub nodes: Vec<&'a DeviceNode>,
    pub env: Vec<(String, String)>,
}

/// The fully qualified name a runtime resolves: `jarvice.com/rdma=rdma-0`.
pub fn qualified(kind: &str, device: &str) -> String {
    format!("{kind}={device}")
}

/// CDI device names: `[A-Za-z0-9][A-Za-z0-9_.:-]*` (our IDs always are).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-'))
}

/// The spec as JSON: host paths, as the runtime resolves them, and for a character device the
/// numbers the scan verified against sysfs.
pub fn render(kind: &str, devices: &[CdiDevice<'_>]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{{\"cdiVersion\":{},\"kind\":{},\"devices\":[",
        quote(CDI_VERSION),
        quote(kind)
    );
    for (i, d) in devices.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"name\":{},\"containerEdits\":{{", quote(&d.name));
        if !d.env.is_empty() {
            let env: Vec<String> = d
                .env
                .iter()
                .map(|(k, v)| quote(&format!("{k}={v}")))
                .collect();
            let _ = write!(out, "\"env\":[{}],", env.join(","));
        }
        out.push_str("\"deviceNodes\":[");
        for (j, n) in d.nodes.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let path = n.host_path.to_string_lossy();
            let _ = write!(out, "{{\"path\":{}", quote(&path));
            // The numbers verified against sysfs at the scan, never a second look at the
            // path (which could be swapped in between): the runtime creates what this says.
            if let Some(d) = n.dev {
                let _ = write!(
                    out,
                    ",\"type\":\"c\",\"major\":{},\"minor\":{}",
                    d.major, d.minor
                );
            }
            out.push_str(",\"permissions\":\"rw\"}");
        }
        out.push_str("]}}");
    }
    out.push_str("]}\n");
    out
}

/// Where the spec of resource `kind` lives in `dir`: `jarvice.com_rdma.json` (`_` cannot occur
/// in a domain, so two kinds never share a file).
pub fn spec_path(dir: &Path, kind: &str) -> PathBuf {
    dir.join(format!("{}.json", kind.replace('/', "_")))
}

/// A resource name CDI accepts as a kind (`vendor/class`): the vendor starts with a letter and
/// holds letters, digits, `.` and `-`; the class starts with a letter, holds letters, digits,
/// `_` and `-`, and ends with a letter or digit. Kubernetes allows more (`9lives.com/ib.hdr`).
pub fn valid_kind(kind: &str) -> bool {
    let Some((vendor, class)) = kind.split_once('/') else {
        return false;
    };
    let starts_alpha = |s: &str| s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
    let ends_alnum = |s: &str| s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    starts_alpha(vendor)
        && ends_alnum(vendor)
        && vendor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && starts_alpha(class)
        && ends_alnum(class)
        && class
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Device and inode of the file at `path`.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Writes `text` to `path` atomically: a temp file in the same directory, fsynced, renamed.
/// World-readable (0644): runtimes read specs as whatever user they run. The directory is made
/// (0755) when missing, not its parents (those are the runtime's: `/var/run`). The temp file has
/// a name nobody can guess and is created exclusively without following a symlink, so nothing
/// planted in the directory makes us write elsewhere. Returns the new file's device and inode.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<(u64, u64)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        }
        Err(e) => return Err(e),
    }
    let bits = crate::sys::random_u64().unwrap_or_else(|_| {
        // getrandom may refuse this early at boot: the time still differs between attempts.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let tmp = temp_name(path, bits);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        // The umask (077) took bits off the mode above; put them back.
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    file_id(path).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "spec vanished"))
}

/// The temp file a write of `path` goes through.
fn temp_name(path: &Path, bits: u64) -> PathBuf {
    let name = path
        .file_name()
        .map_or("spec".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(".{name}.{bits:016x}.tmp"))
}

/// Removes temp files a write of `path` left behind (a process killed mid-write): regular
/// files named as [`write_atomic`] names them, nothing else.
pub fn remove_temp_files(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let n = e.file_name().to_string_lossy().into_owned();
        let ours = n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp"));
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if ours.is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            && is_file
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Reads the file at `path` if it is a regular file of at most `max` bytes, without following
/// a symlink or blocking on a FIFO (a spec path is in a directory others write to).
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    read_regular(path, max, false)
}

/// Reads a regular file of at most `max` bytes, opened without blocking on a FIFO; symlinks are
/// followed only with `follow` (credentials in a projected volume are links into `..data`).
pub fn read_regular(path: &Path, max: u64, follow: bool) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow | libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if m.len() > max {
        return Err(io::Error::other(format!(
            "{} bytes, more than {max} allowed here",
            m.len()
        )));
    }
    let mut out = Vec::with_capacity(m.len() as usize);
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

use std::os::unix::fs::PermissionsExt;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::nodes::Kind;

    #[test]
    fn names_and_rendering_follow_the_spec() {
        assert!(valid_name("rdma-0"));
        assert!(valid_name("hca-0c42a10300c45e00"));
        assert!(valid_name("pci-0000:3b:00.0"));
        assert!(!valid_name("-x") && !valid_name("") && !valid_name("a/b"));
        let n = DeviceNode {
            kind: Kind::Uverbs,
            host_path: "/dev/infiniband/uverbs0".into(),
            numa_node: None,
            hca: None,
            dev: None,
        };
        let d = CdiDevice {
            name: "rdma-0".into(),
            nodes: vec![&n],
            env: vec![("JARVICE_RDMA_HCAS".into(), "mlx5_0".into())],
        };
        assert_eq!(
            render("jarvice.com/rdma", &[d]),
            "{\"cdiVersion\":\"0.6.0\",\"kind\":\"jarvice.com/rdma\",\"devices\":[{\"name\":\"rdma-0\",\"containerEdits\":{\"env\":[\"JARVICE_RDMA_HCAS=mlx5_0\"],\"deviceNodes\":[{\"path\":\"/dev/infiniband/uverbs0\",\"permissions\":\"rw\"}]}}]}\n"
        );
        assert_eq!(
            spec_path(Path::new("/var/run/cdi"), "jarvice.com/rdma"),
            Path::new("/var/run/cdi/jarvice.com_rdma.json")
        );
        assert!(valid_kind("jarvice.com/rdma") && valid_kind("a-b.example/hca_2"));
        for bad in [
            "9lives.com/rdma",
            "jarvice.com/ib.hdr",
            "jarvice.com/-x",
            "x/",
            "rdma",
        ] {
            assert!(!valid_kind(bad), "{bad}");
        }
    }
}
