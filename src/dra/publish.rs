//! Keeps the node's pool of ResourceSlices (one per 64 devices; one on any real node) in the API
//! server as the host is: created at start, all of them rewritten with the next generation on
//! every change (the scheduler takes a pool only when every slice has its newest generation),
//! created again when the kubelet wipes them (at each kubelet start, and 30 s after the last
//! instance of a driver disconnects), and checked after each kubelet registration and now and
//! then, since nothing tells us of a wipe. It runs on a thread
//! of its own ([`spawn`]): an API server that hangs costs that thread its request timeouts, never
//! the main loop its signals. Every failure is logged and retried with backoff, never fatal.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::{DeviceTaint, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use log::{debug, info, warn};
use serde_json::Value;

use crate::dra::devices::Inventory;
use crate::dra::slice::{self, Pool};
use crate::kube::{self, Kube};

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";
/// Retry after a failure: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The slice is looked at again this often even when nothing happened (a wipe says nothing).
pub const VERIFY_EVERY: Duration = Duration::from_secs(30);
/// After a kubelet registers us: it wipes the node's slices at its start, before or after our
/// registration, so look at once and again at these delays.
const AFTER_REGISTRATION: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(10),
];

/// What is in the API server, as far as we know.
#[derive(Clone)]
struct Published {
    name: String,
    resource_version: String,
    /// The spec as we last wrote it (or found it): a wanted slice equal to it is not sent.
    spec: Value,
}

/// The publisher of one node's slice.
pub struct Publisher {
    kube: Kube,
    driver: String,
    node: String,
    node_uid: Option<String>,
    generation: i64,
    /// The pool's slices as the API server has them, by index; `None`: gone (wiped).
    published: Vec<Option<Published>>,
    /// Whether `published` comes from a listing since the start or the last conflict.
    adopted: bool,
    /// When each Unhealthy device was first seen so (its taint's `timeAdded`).
    taint_since: BTreeMap<String, k8s_openapi::jiff::Timestamp>,
    /// The pool as it should be.
    wanted: Option<Vec<ResourceSlice>>,
    retry_at: Option<Instant>,
    backoff: Duration,
    verify_at: Vec<Instant>,
    /// Devices the last build left out (logged once per change).
    left_out: Vec<String>,
    /// Said once: the Node cannot be read, the slice has no owner.
    no_owner_warned: bool,
    /// Said once: the API server dropped our taints (DRADeviceTaints off).
    taints_dropped_warned: bool,
    /// Where slice writes are counted.
    observer: Option<std::sync::Arc<crate::observe::Observer>>,
}

impl Publisher {
    pub fn new(kube: Kube, driver: &str, node: &str) -> Publisher {
        Publisher {
            kube,
            driver: driver.to_string(),
            node: node.to_string(),
            node_uid: None,
            generation: 0,
            published: Vec::new(),
            adopted: false,
            taint_since: BTreeMap::new(),
            wanted: None,
            retry_at: Some(Instant::now()),
            backoff: RETRY_FIRST,
            verify_at: vec![Instant::now() + VERIFY_EVERY],
            left_out: Vec::new(),
            no_owner_warned: false,
            taints_dropped_warned: false,
            observer: None,
        }
    }

    /// Counts every slice write in `observer`.
    pub fn observed(mut self, observer: std::sync::Arc<crate::observe::Observer>) -> Publisher {
        self.observer = Some(observer);
        self
    }

    /// The slice for `inv`, to be sent at the next [`Publisher::sync`] if it differs.
    pub fn want(&mut self, inv: &Inventory, now: k8s_openapi::jiff::Timestamp) {
        let mut tainted = BTreeMap::new();
        self.taint_since
            .retain(|name, _| inv.get(name).is_some_and(|d| !d.healthy));
        for d in inv.devices.iter().filter(|d| !d.healthy) {
            let since = *self.taint_since.entry(d.name.clone()).or_insert(now);
            tainted.insert(d.name.clone(), slice::taint(&self.driver, &d.reason, since));
        }
        let (s, left_out) = self.build(inv, &tainted);
        if left_out != self.left_out {
            if !left_out.is_empty() {
                warn!(
                    "a pool holds at most {} slices of {} devices: left out {}",
                    slice::MAX_SLICES,
                    slice::MAX_DEVICES_TAINTED,
                    left_out.join(", ")
                );
            }
            self.left_out = left_out;
        }
        let specs = |v: &[ResourceSlice]| v.iter().map(spec_value).collect::<Vec<_>>();
        if self.wanted.as_deref().map(specs) != Some(specs(&s)) {
            self.wanted = Some(s);
            self.retry_at = Some(Instant::now());
            self.backoff = RETRY_FIRST;
        }
    }

    fn build(
        &self,
        inv: &Inventory,
        tainted: &BTreeMap<String, DeviceTaint>,
    ) -> (Vec<ResourceSlice>, Vec<String>) {
        let pool = Pool {
            driver: &self.driver,
            node: &self.node,
            node_uid: self.node_uid.as_deref(),
            generation: self.generation,
        };
        slice::build(&pool, inv, tainted)
    }

    /// A kubelet (re)registered us: it may have wiped our slice, now or in a moment.
    pub fn kubelet_registered(&mut self) {
        let now = Instant::now();
        self.verify_at = AFTER_REGISTRATION.iter().map(|d| now + *d).collect();
        self.verify_at.push(now + VERIFY_EVERY);
        self.retry_at = Some(now);
    }

    /// When [`Publisher::sync`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        self.retry_at
            .into_iter()
            .chain(self.verify_at.iter().copied())
            .min()
    }

    /// Sends what is due: the wanted slice if it differs from the published one, a check that
    /// the published one is still there when a verification is due.
    pub fn sync(&mut self, now: Instant) {
        let verify = self.verify_at.iter().any(|t| *t <= now);
        let retry = self.retry_at.is_some_and(|t| t <= now);
        if !verify && !retry {
            return;
        }
        if verify {
            self.verify_at.retain(|t| *t > now);
            if self.verify_at.is_empty() {
                self.verify_at.push(now + VERIFY_EVERY);
            }
        }
        match self.try_sync(verify) {
            Ok(()) => {
                self.retry_at = None;
                self.backoff = RETRY_FIRST;
            }
            Err(e) => {
                warn!(
                    "cannot publish the ResourceSlice of {} (retrying in {:?}): {e}",
                    self.node, self.backoff
                );
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
            }
        }
    }

    fn try_sync(&mut self, verify: bool) -> Result<(), kube::Error> {
        if self.node_uid.is_none() {
            // Plain JSON for the one field we need (a typed Node would bring every node type's
            // decoder into the binary).
            match self
                .kube
                .get::<Value>(&format!("/api/v1/nodes/{}", kube::escape(&self.node)))
            {
                Ok(node) => self.node_uid = node["metadata"]["uid"].as_str().map(str::to_string),
                // The owner is a nicety (the slice goes with the Node): publish without it.
                Err(e) if matches!(e.code(), Some(403 | 404)) => {
                    if !self.no_owner_warned {
                        warn!(
                            "cannot read Node {} ({e}): publishing the ResourceSlice without an owner",
                            self.node
                        );
                        self.no_owner_warned = true;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if !self.adopted {
            self.adopt()?;
        } else if verify {
            self.check()?;
        }
        let Some(wanted) = self.wanted.clone() else {
            return Ok(());
        };
        let current = wanted.len() == self.published.len()
            && wanted
                .iter()
                .zip(&self.published)
                .all(|(w, p)| p.as_ref().is_some_and(|p| p.spec == spec_value(w)));
        if current {
            return Ok(());
        }
        self.write(wanted)
    }

    /// Takes over the slices of this node and driver a previous instance left (or that are
    /// there after a conflict): they are rewritten in place, extras deleted.
    fn adopt(&mut self) -> Result<(), kube::Error> {
        let list: Value = self.kube.get(&self.selector_path())?;
        let mut items = list["items"].as_array().cloned().unwrap_or_default();
        items.sort_by(|a, b| {
            a["metadata"]["name"]
                .as_str()
                .cmp(&b["metadata"]["name"].as_str())
        });
        for it in &items {
            let generation = it["spec"]["pool"]["generation"].as_i64().unwrap_or(0);
            self.generation = self.generation.max(generation);
        }
        if !items.is_empty() {
            debug!("found {} ResourceSlice(s) of this node", items.len());
        }
        self.published = items
            .iter()
            .map(|it| Some(stored(it, spec_of(it))))
            .collect();
        self.adopted = true;
        Ok(())
    }

    /// Are our slices still there, as we wrote them? The kubelet deletes them at its start and
    /// after we disconnect; anyone with the rights may change them.
    fn check(&mut self) -> Result<(), kube::Error> {
        for i in 0..self.published.len() {
            let Some(p) = &self.published[i] else {
                continue;
            };
            match self
                .kube
                .get::<Value>(&format!("{SLICES}/{}", kube::escape(&p.name)))
            {
                Ok(s) => {
                    if s["metadata"]["resourceVersion"].as_str()
                        != Some(p.resource_version.as_str())
                    {
                        warn!(
                            "ResourceSlice {} was changed by someone else: writing ours again",
                            p.name
                        );
                        // A spec no wanted slice equals: the next step writes ours.
                        self.published[i] = Some(stored(&s, Value::Null));
                    }
                }
                Err(e) if e.code() == Some(404) => {
                    warn!(
                        "ResourceSlice {} is gone (the kubelet wipes a node's slices when it starts): publishing it again",
                        p.name
                    );
                    self.published[i] = None;
                    // The Node may have been made again (the garbage collector deletes a slice
                    // whose owner is gone): read its UID again.
                    self.node_uid = None;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes every slice of the pool with the next generation (updating those that exist,
    /// creating the others) and deletes the ones beyond it.
    fn write(&mut self, wanted: Vec<ResourceSlice>) -> Result<(), kube::Error> {
        self.generation += 1;
        let count = wanted.len();
        for (i, mut w) in wanted.into_iter().enumerate() {
            w.spec.pool.generation = self.generation;
            if let Some(uid) = &self.node_uid {
                w.metadata.owner_references = Some(vec![OwnerReference {
                    api_version: "v1".to_string(),
                    kind: "Node".to_string(),
                    name: self.node.clone(),
                    uid: uid.clone(),
                    controller: Some(true),
                    ..Default::default()
                }]);
            }
            let existing = self.published.get(i).cloned().flatten();
            let answer = self.write_one(w, existing.as_ref());
            if let Some(o) = &self.observer {
                let result = if answer.is_ok() { "ok" } else { "error" };
                o.count("slice_writes", &[("result", result)]);
            }
            let answer = answer?;
            if i < self.published.len() {
                self.published[i] = Some(answer);
            } else {
                self.published.push(Some(answer));
            }
        }
        while self.published.len() > count {
            if let Some(Some(p)) = self.published.pop() {
                info!("deleting ResourceSlice {}: the pool is smaller now", p.name);
                match self
                    .kube
                    .delete(&format!("{SLICES}/{}", kube::escape(&p.name)))
                {
                    Err(e) if e.code() != Some(404) => {
                        self.published.push(Some(p));
                        return Err(e);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn write_one(
        &mut self,
        mut w: ResourceSlice,
        existing: Option<&Published>,
    ) -> Result<Published, kube::Error> {
        let sent = spec_value(&w);
        let result = match existing {
            Some(p) => {
                w.metadata.name = Some(p.name.clone());
                w.metadata.generate_name = None;
                w.metadata.resource_version = Some(p.resource_version.clone());
                self.kube
                    .put::<_, Value>(&format!("{SLICES}/{}", kube::escape(&p.name)), &w)
            }
            None => self.kube.post::<_, Value>(SLICES, &w),
        };
        match result {
            Ok(answer) => {
                info!(
                    "published ResourceSlice {} (generation {}, {} device(s))",
                    answer["metadata"]["name"].as_str().unwrap_or("?"),
                    self.generation,
                    w.spec.devices.as_ref().map_or(0, Vec::len)
                );
                // Where the DRADeviceTaints feature is off the API server drops taints: then an
                // Unhealthy device stays allocatable, which an operator must hear of.
                let taints = |v: &Value| {
                    v["devices"]
                        .as_array()
                        .is_some_and(|d| d.iter().any(|x| x["taints"].is_array()))
                };
                if taints(&sent) && !taints(&answer["spec"]) && !self.taints_dropped_warned {
                    warn!("the API server dropped our device taints (feature gate DRADeviceTaints off?): Unhealthy devices stay allocatable; the health stream still reports them");
                    self.taints_dropped_warned = true;
                }
                // What we sent is what we compare with next time: the API server may add
                // defaults to what it stores, which must not look like a change every time.
                Ok(stored(&answer, sent))
            }
            Err(e) => {
                // 404: wiped since we looked; 409: changed since we looked (optimistic
                // concurrency). Either way, list again before the next write.
                if matches!(e.code(), Some(404 | 409)) {
                    self.adopted = false;
                    self.published.clear();
                }
                Err(e)
            }
        }
    }

    fn selector_path(&self) -> String {
        format!(
            "{SLICES}?fieldSelector={}",
            kube::escape(&format!(
                "spec.nodeName={},spec.driver={}",
                self.node, self.driver
            ))
        )
    }
}

/// What the main loop tells the publisher thread.
enum Msg {
    Want(Arc<Inventory>),
    Registered,
}

/// The publisher thread. Dropping the handle ends it (after the request under way, if any).
/// The slice stays at exit: the kubelet wipes it 30 s after we disconnect, and a rolling update
/// is back before that.
pub struct Handle {
    tx: Sender<Msg>,
}

/// Stack of the publisher thread: TLS and JSON need more than the stream threads' 256 KiB.
const STACK_SIZE: usize = 1 << 20;

/// Starts `p` on its own thread.
pub fn spawn(mut p: Publisher) -> std::io::Result<Handle> {
    let (tx, rx) = mpsc::channel::<Msg>();
    std::thread::Builder::new()
        .name("publisher".into())
        .stack_size(STACK_SIZE)
        .spawn(move || loop {
            let wait = p.deadline().map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
            let mut next = match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // Only the latest inventory matters: take every message queued meanwhile.
            while let Some(m) = next {
                match m {
                    Msg::Want(inv) => p.want(&inv, slice::now()),
                    Msg::Registered => p.kubelet_registered(),
                }
                next = rx.try_recv().ok();
            }
            p.sync(Instant::now());
        })?;
    Ok(Handle { tx })
}

impl Handle {
    /// Publish `inv` (now, if it changes the slice).
    pub fn want(&self, inv: Arc<Inventory>) {
        let _ = self.tx.send(Msg::Want(inv));
    }

    /// A kubelet registered us: it may wipe our slice now or in a moment.
    pub fn registered(&self) {
        let _ = self.tx.send(Msg::Registered);
    }
}

/// The slice the API server answered with, and the spec we hold it to.
fn stored(answer: &Value, spec: Value) -> Published {
    Published {
        name: answer["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        resource_version: answer["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        spec,
    }
}

/// What we compare: the spec without the generation (which we bump on each write).
fn spec_value(s: &ResourceSlice) -> Value {
    without_generation(serde_json::to_value(&s.spec).unwrap_or_default())
}

/// A stored slice's spec, compared the same way.
fn spec_of(s: &Value) -> Value {
    without_generation(s["spec"].clone())
}

fn without_generation(mut v: Value) -> Value {
    if let Some(pool) = v.get_mut("pool").and_then(|p| p.as_object_mut()) {
        pool.remove("generation");
    }
    v
}
