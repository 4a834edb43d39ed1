//! NodePrepareResources and NodeUnprepareResources: a claim's devices become one CDI spec file
//! of its own (`<cdi-dir>/<driver>-claim-<uid>.json`, written atomically), whose device names
//! carry the claim UID (`k8s.rdma.jarvice.com/claim=<uid>-mlx5-0`) so a runtime's cache never
//! serves another claim's entry. The files are also the record of what is prepared: a restart
//! reads them back, so it neither forgets a claim (unprepare still removes it) nor prepares one
//! twice (a repeat is answered from the file, without the API server).
//!
//! The kubelet is trusted for what it checked (the claim is reserved for a pod here); the API
//! server for the allocation. Everything else is checked: the UID, our driver and pool, devices
//! we published, a bound on results, and the device nodes are the ones the scan verified.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use log::{debug, info, warn};
use serde_json::json;

use crate::config::{is_dns_label, is_dns_subdomain};
use crate::dra::devices::Inventory;
use crate::host::nodes::{DeviceNode, Kind};
use crate::kube::{self, Kube};
use crate::resource::cdi;
use crate::resource::per_hca::HCAS_ENV;

/// Results of our driver one claim may name: more than a node could ever publish is an attack.
pub const MAX_RESULTS: usize = 128;
/// Claims one call may name (the kubelet sends a pod's claims: a handful).
pub const MAX_CLAIMS: usize = 256;
/// Other claims holding a device that one prepare asks the API server about (each a request
/// of up to 10 s, within the call's budget).
const MAX_HOLDER_CHECKS: usize = 2;
/// The largest spec file we read back.
const MAX_SPEC: u64 = 1 << 20;

/// One device of a prepared claim, as the kubelet gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub request: String,
    pub pool: String,
    pub device: String,
    pub cdi_id: String,
    /// Allocated with `adminAccess` (monitoring, not use): may share a device with a claim.
    pub admin: bool,
}

/// A prepare's answer: the claim's devices, and whether this call prepared it (false: it was
/// prepared before, by an earlier call or a previous instance).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub devices: Vec<Prepared>,
    pub new: bool,
}

impl Outcome {
    fn repeat(record: &Record) -> Outcome {
        Outcome {
            devices: record.devices.clone(),
            new: false,
        }
    }
}

/// What the record says of one prepared claim.
#[derive(Clone, Debug)]
struct Record {
    /// `namespace/name`, to ask the API server whether a claim holding a device still exists.
    claim: String,
    devices: Vec<Prepared>,
}

/// The claims prepared, and the prepares under way.
#[derive(Default)]
struct State {
    prepared: BTreeMap<String, Record>,
    /// Claim UID -> (prepare calls under way, unprepares seen since the first of them began).
    /// A prepare writes its spec only if no unprepare came meanwhile: the kubelet cancels a
    /// prepare and unprepares when a pod goes, and the late spec would hold the devices for
    /// ever.
    in_flight: BTreeMap<String, (usize, u64)>,
}

/// The claims prepared on this node.
pub struct Claims {
    dir: PathBuf,
    driver: String,
    node: String,
    /// CDI kind of the per-claim specs: `k8s.<driver>/claim`.
    kind: String,
    /// Also set `NCCL_IB_HCA` and `UCX_NET_DEVICES` (`--hca-envs`), as Allocate does.
    hca_envs: bool,
    /// Held while a spec is written, so two prepares cannot both take one device.
    state: Mutex<State>,
}

/// One allocation result of our driver.
struct Allocated {
    request: String,
    pool: String,
    device: String,
    admin: bool,
}

/// Counts a prepare as under way until dropped.
struct Flight<'a> {
    claims: &'a Claims,
    uid: String,
    /// The number of unprepares seen for this UID when the prepare began.
    epoch: u64,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut st = self.claims.lock();
        if let Some((calls, _)) = st.in_flight.get_mut(&self.uid) {
            *calls -= 1;
            if *calls == 0 {
                st.in_flight.remove(&self.uid);
            }
        }
    }
}

/// The kubelet's claim reference.
#[derive(Clone, Debug)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Claims {
    /// The record of `dir`: every spec file of ours there (a previous instance's included).
    pub fn load(dir: &Path, driver: &str, node: &str, hca_envs: bool) -> Claims {
        let c = Claims {
            hca_envs,
            dir: dir.to_path_buf(),
            driver: driver.to_string(),
            node: node.to_string(),
            kind: format!("k8s.{driver}/claim"),
            state: Mutex::new(State::default()),
        };
        let prefix = c.file_prefix();
        let mut found = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(uid) = name
                    .strip_prefix(&prefix)
                    .and_then(|r| r.strip_suffix(".json"))
                else {
                    continue;
                };
                if !valid_uid(uid) {
                    continue;
                }
                match c.read_record(uid) {
                    Some(record) => {
                        found.insert(uid.to_string(), record);
                    }
                    None => warn!(
                        "{}: not a claim spec of ours; left alone",
                        e.path().display()
                    ),
                }
            }
        }
        if !found.is_empty() {
            info!("{} claim(s) prepared before this start", found.len());
        }
        c.lock().prepared = found;
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn file_prefix(&self) -> String {
        format!("{}-claim-", self.driver)
    }

    /// The devices prepared claims hold (admin access aside: it holds nothing), one entry per
    /// claim and device.
    pub fn held_devices(&self) -> Vec<String> {
        self.lock()
            .prepared
            .values()
            .flat_map(|r| r.devices.iter().filter(|d| !d.admin))
            .map(|d| d.device.clone())
            .collect()
    }

    /// Where the spec of claim `uid` lives (a checked UID only).
    pub fn spec_path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{}{uid}.json", self.file_prefix()))
    }

    /// Prepares one claim: its devices, or why not (the kubelet retries at the pod's next sync).
    /// A request to the API server starts only if it can end (one [`kube::REQUEST_TIMEOUT`])
    /// by `deadline`, so the kubelet's call is answered in time.
    pub fn prepare(
        &self,
        kube: &Kube,
        inv: &Inventory,
        claim: &ClaimRef,
        deadline: std::time::Instant,
    ) -> Result<Outcome, String> {
        let in_time = || {
            if std::time::Instant::now() + kube::REQUEST_TIMEOUT > deadline {
                Err("not enough of this call's time left; the kubelet tries again".to_string())
            } else {
                Ok(())
            }
        };
        check_ref(claim)?;
        let flight = {
            let mut st = self.lock();
            if let Some(done) = st.prepared.get(&claim.uid) {
                debug!("claim {}/{} already prepared", claim.namespace, claim.name);
                return Ok(Outcome::repeat(done));
            }
            let entry = st.in_flight.entry(claim.uid.clone()).or_insert((0, 0));
            entry.0 += 1;
            Flight {
                claims: self,
                uid: claim.uid.clone(),
                epoch: entry.1,
            }
        };
        in_time()?;
        let path = format!(
            "/apis/resource.k8s.io/v1/namespaces/{}/resourceclaims/{}",
            kube::escape(&claim.namespace),
            kube::escape(&claim.name)
        );
        // Read as plain JSON, only the fields used: a typed claim would bring every claim
        // type's decoder into the binary for four strings.
        let rc: serde_json::Value = kube.get(&path).map_err(|e| match e.code() {
            Some(404) => format!(
                "claim {}/{} does not exist (deleted?)",
                claim.namespace, claim.name
            ),
            _ => format!("cannot fetch claim {}/{}: {e}", claim.namespace, claim.name),
        })?;
        let uid = rc["metadata"]["uid"].as_str().unwrap_or("");
        if uid != claim.uid {
            return Err(format!(
                "claim {}/{} has UID {uid:?}, not {:?}: it was deleted and made again",
                claim.namespace, claim.name, claim.uid
            ));
        }
        let results = rc["status"]["allocation"]["devices"]["results"]
            .as_array()
            .ok_or_else(|| format!("claim {}/{} is not allocated", claim.namespace, claim.name))?;
        let mut ours: Vec<Allocated> = Vec::new();
        for r in results {
            if r["driver"].as_str() != Some(self.driver.as_str()) {
                continue;
            }
            if ours.len() >= MAX_RESULTS {
                return Err(format!(
                    "claim {}/{} names more devices of {} than any node publishes ({MAX_RESULTS})",
                    claim.namespace, claim.name, self.driver
                ));
            }
            let field = |k: &str| {
                r[k].as_str().map(str::to_string).ok_or_else(|| {
                    format!(
                        "claim {}/{}: a result of {} has no {k}",
                        claim.namespace, claim.name, self.driver
                    )
                })
            };
            ours.push(Allocated {
                request: field("request")?,
                pool: field("pool")?,
                device: field("device")?,
                admin: r["adminAccess"].as_bool() == Some(true),
            });
        }
        if ours.is_empty() {
            return Err(format!(
                "claim {}/{} has no device of driver {}",
                claim.namespace, claim.name, self.driver
            ));
        }
        let mut devices = Vec::new();
        let mut edits = Vec::new();
        let mut hcas: Vec<String> = Vec::new();
        let mut ports: Vec<String> = Vec::new();
        for r in &ours {
            if r.pool != self.node {
                return Err(format!(
                    "claim {}/{}: device {:?} is in pool {:?}, not this node's ({})",
                    claim.namespace, claim.name, r.device, r.pool, self.node
                ));
            }
            let Some(d) = inv.get(&r.device) else {
                return Err(format!(
                    "claim {}/{}: device {:?} is not one this node publishes",
                    claim.namespace, claim.name, r.device
                ));
            };
            if !d.healthy {
                warn!(
                    "claim {}/{}: preparing {} although it is Unhealthy ({})",
                    claim.namespace, claim.name, d.name, d.reason
                );
            }
            let cdi_name = format!("{}-{}", claim.uid, d.name);
            if !edits.iter().any(|(n, _): &(String, _)| *n == cdi_name) {
                edits.push((cdi_name.clone(), d.nodes.clone()));
            }
            // As Allocate: no verbs node, nothing a verbs program could use.
            if !d.nodes.iter().any(|n| n.kind == Kind::Uverbs) {
                return Err(format!(
                    "claim {}/{}: device {} has no uverbs node right now",
                    claim.namespace, claim.name, d.name
                ));
            }
            for h in &d.hcas {
                if !hcas.contains(h) {
                    hcas.push(h.clone());
                }
            }
            for p in &d.ports {
                if !ports.contains(p) {
                    ports.push(p.clone());
                }
            }
            devices.push(Prepared {
                request: r.request.clone(),
                pool: r.pool.clone(),
                device: d.name.clone(),
                cdi_id: cdi::qualified(&self.kind, &cdi_name),
                admin: r.admin,
            });
        }
        // A claim our record says holds one of these devices may be gone without an
        // unprepare (the kubelet's state lost, a claim deleted meanwhile): asked, not assumed.
        let holders = self.holders(&claim.uid, &devices);
        if holders.len() > MAX_HOLDER_CHECKS {
            return Err(format!(
                "claim {}/{}: its devices are prepared for {} other claims still",
                claim.namespace,
                claim.name,
                holders.len()
            ));
        }
        for (uid, record) in holders {
            in_time()?;
            self.drop_if_gone(kube, &uid, &record)?;
        }
        let mut st = self.lock();
        if st.in_flight.get(&claim.uid).map(|f| f.1) != Some(flight.epoch) {
            return Err(format!(
                "claim {}/{} was unprepared while being prepared: not prepared",
                claim.namespace, claim.name
            ));
        }
        if let Some(done) = st.prepared.get(&claim.uid) {
            // A concurrent call prepared it meanwhile.
            return Ok(Outcome::repeat(done));
        }
        // Another claim holding one of these devices (taken since we looked): the
        // allocation is stale or forged.
        if let Some((other, d)) = conflict(&st.prepared, &claim.uid, &devices) {
            return Err(format!(
                "claim {}/{}: device {d} is prepared for claim {other} still",
                claim.namespace, claim.name
            ));
        }
        let mut env = Vec::new();
        if !hcas.is_empty() {
            env.push(format!("{HCAS_ENV}={}", hcas.join(",")));
            if self.hca_envs {
                // `=`: exact names, not prefixes (NCCL would take mlx5_1 for mlx5_10 too).
                env.push(format!("NCCL_IB_HCA=={}", hcas.join(",")));
                env.push(format!("UCX_NET_DEVICES={}", ports.join(",")));
            }
        }
        let text = self.render(claim, &devices, &edits, &env);
        cdi::write_atomic(&self.spec_path(&claim.uid), &text).map_err(|e| {
            format!(
                "cannot write the CDI spec {}: {e}",
                self.spec_path(&claim.uid).display()
            )
        })?;
        info!(
            "prepared claim {}/{} ({}): {}",
            claim.namespace,
            claim.name,
            claim.uid,
            devices
                .iter()
                .map(|d| d.device.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        st.prepared.insert(
            claim.uid.clone(),
            Record {
                claim: format!("{}/{}", claim.namespace, claim.name),
                devices: devices.clone(),
            },
        );
        Ok(Outcome { devices, new: true })
    }

    /// The other prepared claims that hold a device of `devices` (admin access aside).
    fn holders(&self, uid: &str, devices: &[Prepared]) -> Vec<(String, Record)> {
        let st = self.lock();
        st.prepared
            .iter()
            .filter(|(other, r)| *other != uid && r.devices.iter().any(|t| clashes(t, devices)))
            .map(|(u, r)| (u.clone(), r.clone()))
            .collect()
    }

    /// Drops the record of claim `uid` if the API server says it no longer holds its devices
    /// (deleted, made again under its name, or no longer allocated here); an error if it
    /// still does, or if the API server cannot tell.
    fn drop_if_gone(&self, kube: &Kube, uid: &str, record: &Record) -> Result<(), String> {
        let (ns, name) = record.claim.split_once('/').unwrap_or(("", ""));
        let still = if is_dns_label(ns, 63) && is_dns_subdomain(name, 253) {
            let path = format!(
                "/apis/resource.k8s.io/v1/namespaces/{}/resourceclaims/{}",
                kube::escape(ns),
                kube::escape(name)
            );
            match kube.get::<serde_json::Value>(&path) {
                Ok(c) => {
                    c["metadata"]["uid"].as_str() == Some(uid)
                        && c["status"]["allocation"]["devices"]["results"]
                            .as_array()
                            .is_some_and(|rs| {
                                rs.iter().any(|r| {
                                    r["driver"].as_str() == Some(self.driver.as_str())
                                        && r["pool"].as_str() == Some(self.node.as_str())
                                })
                            })
                }
                Err(e) if e.code() == Some(404) => false,
                Err(e) => {
                    return Err(format!(
                        "a device is prepared for claim {} ({uid}), which cannot be checked: {e}",
                        record.claim
                    ))
                }
            }
        } else {
            false
        };
        if still {
            let d = record.devices.first().map_or("?", |d| d.device.as_str());
            return Err(format!(
                "device {d} is prepared for claim {} ({uid}) still",
                record.claim
            ));
        }
        warn!(
            "claim {} ({uid}) is gone without an unprepare: dropping its CDI spec, which held its devices",
            record.claim
        );
        let mut st = self.lock();
        if st.prepared.remove(uid).is_some() {
            let _ = fs::remove_file(self.spec_path(uid));
        }
        Ok(())
    }

    /// Unprepares one claim: its spec goes. A claim we never prepared succeeds.
    pub fn unprepare(&self, claim: &ClaimRef) -> Result<(), String> {
        if !valid_uid(&claim.uid) {
            // Nothing of ours can carry it: nothing to undo.
            return Ok(());
        }
        let mut st = self.lock();
        // A prepare of this claim under way must not write its spec after this.
        if let Some(f) = st.in_flight.get_mut(&claim.uid) {
            f.1 += 1;
        }
        let path = self.spec_path(&claim.uid);
        match fs::remove_file(&path) {
            Ok(()) => info!(
                "unprepared claim {}/{} ({})",
                claim.namespace, claim.name, claim.uid
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
        }
        st.prepared.remove(&claim.uid);
        Ok(())
    }

    fn render(
        &self,
        claim: &ClaimRef,
        devices: &[Prepared],
        edits: &[(String, Vec<DeviceNode>)],
        env: &[String],
    ) -> String {
        let record: Vec<serde_json::Value> = devices
            .iter()
            .map(|d| json!([d.request, d.device, d.admin]))
            .collect();
        let cdi_devices: Vec<serde_json::Value> = edits
            .iter()
            .map(|(name, nodes)| {
                json!({
                    "name": name,
                    "containerEdits": {"deviceNodes": nodes.iter().map(node_json).collect::<Vec<_>>()},
                })
            })
            .collect();
        let mut spec = json!({
            "cdiVersion": cdi::CDI_VERSION,
            "kind": self.kind,
            "annotations": {
                format!("{}/claim", self.driver): format!("{}/{}", claim.namespace, claim.name),
                format!("{}/devices", self.driver): serde_json::Value::Array(record).to_string(),
            },
            "devices": cdi_devices,
        });
        // Envs for the claim (per-device envs would replace each other in the container).
        if !env.is_empty() {
            spec["containerEdits"] = json!({ "env": env });
        }
        let mut text = spec.to_string();
        text.push('\n');
        text
    }

    /// The devices a spec file records, if it is one of ours.
    fn read_record(&self, uid: &str) -> Option<Record> {
        let bytes = cdi::read_bounded(&self.spec_path(uid), MAX_SPEC).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        if v.get("kind")?.as_str()? != self.kind {
            return None;
        }
        let record = v
            .get("annotations")?
            .get(format!("{}/devices", self.driver))?
            .as_str()?;
        let claim = v
            .get("annotations")?
            .get(format!("{}/claim", self.driver))?
            .as_str()?
            .to_string();
        let entries: Vec<serde_json::Value> = serde_json::from_str(record).ok()?;
        let mut devices = Vec::new();
        for e in entries {
            let (request, device) = (e.get(0)?.as_str()?, e.get(1)?.as_str()?);
            devices.push(Prepared {
                cdi_id: cdi::qualified(&self.kind, &format!("{uid}-{device}")),
                request: request.to_string(),
                pool: self.node.clone(),
                device: device.to_string(),
                admin: e.get(2).and_then(|a| a.as_bool()) == Some(true),
            });
        }
        Some(Record { claim, devices })
    }
}

/// True when `held` and one of `wanted` are the same device and neither is admin access.
fn clashes(held: &Prepared, wanted: &[Prepared]) -> bool {
    !held.admin && wanted.iter().any(|w| !w.admin && w.device == held.device)
}

/// The first other claim in `prepared` that holds a device of `devices`.
fn conflict(
    prepared: &BTreeMap<String, Record>,
    uid: &str,
    devices: &[Prepared],
) -> Option<(String, String)> {
    prepared.iter().find_map(|(other, r)| {
        if other == uid {
            return None;
        }
        r.devices
            .iter()
            .find(|t| clashes(t, devices))
            .map(|t| (other.clone(), t.device.clone()))
    })
}

/// A CDI device node: the host path, and the numbers the scan verified for a character device.
fn node_json(n: &DeviceNode) -> serde_json::Value {
    let mut v = json!({"path": n.host_path.to_string_lossy(), "permissions": "rw"});
    if let Some(d) = n.dev {
        v["type"] = json!("c");
        v["major"] = json!(d.major);
        v["minor"] = json!(d.minor);
    }
    v
}

/// A Kubernetes UID as the API server makes them (a UUID, lowercase): it names a file, so
/// nothing else is taken.
pub fn valid_uid(uid: &str) -> bool {
    let b = uid.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

/// The kubelet's reference must name a claim the API server could hold.
fn check_ref(c: &ClaimRef) -> Result<(), String> {
    if !valid_uid(&c.uid) {
        return Err(format!("claim UID {:?} is not a UID", c.uid));
    }
    if !is_dns_label(&c.namespace, 63) {
        return Err(format!(
            "claim namespace {:?} is not a namespace name",
            c.namespace
        ));
    }
    if !is_dns_subdomain(&c.name, 253) {
        return Err(format!("claim name {:?} is not an object name", c.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids() {
        assert!(valid_uid("0b1e6a4c-7d2f-4a51-9c1e-2f3a4b5c6d7e"));
        assert!(!valid_uid("0B1E6A4C-7D2F-4A51-9C1E-2F3A4B5C6D7E"));
        assert!(!valid_uid("../../etc/passwd-0000-0000-0000000000"));
        assert!(!valid_uid("0b1e6a4c-7d2f-4a51-9c1e-2f3a4b5c6d7"));
        assert!(!valid_uid(""));
    }
}
