//! Keeps the node's ResourceSlice in the API server as the host is: created at start, updated
//! on every change (generation bumped), created again when the kubelet wipes it (at each kubelet
//! start, and 30 s after the last instance of a driver disconnects), and checked after each
//! kubelet registration and now and then, since nothing tells us of a wipe. It runs on a thread
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
use crate::dra::kube::{self, Kube};
use crate::dra::slice::{self, Pool};

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
    published: Option<Published>,
    /// When each Unhealthy device was first seen so (its taint's `timeAdded`).
    taint_since: BTreeMap<String, k8s_openapi::jiff::Timestamp>,
    /// Why each device is tainted (so the taint changes when the reason does).
    wanted: Option<ResourceSlice>,
    retry_at: Option<Instant>,
    backoff: Duration,
    verify_at: Vec<Instant>,
    /// Devices the last build left out (logged once per change).
    left_out: Vec<String>,
    /// Said once: the Node cannot be read, the slice has no owner.
    no_owner_warned: bool,
    /// Said once: the API server dropped our taints (DRADeviceTaints off).
    taints_dropped_warned: bool,
    /// Counters for tests and the benchmark.
    pub writes: u64,
    pub recreated: u64,
}

impl Publisher {
    pub fn new(kube: Kube, driver: &str, node: &str) -> Publisher {
        Publisher {
            kube,
            driver: driver.to_string(),
            node: node.to_string(),
            node_uid: None,
            generation: 0,
            published: None,
            taint_since: BTreeMap::new(),
            wanted: None,
            retry_at: Some(Instant::now()),
            backoff: RETRY_FIRST,
            verify_at: vec![Instant::now() + VERIFY_EVERY],
            left_out: Vec::new(),
            no_owner_warned: false,
            taints_dropped_warned: false,
            writes: 0,
            recreated: 0,
        }
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
                    "a ResourceSlice holds at most {} devices: left out {}",
                    slice::MAX_DEVICES_TAINTED,
                    left_out.join(", ")
                );
            }
            self.left_out = left_out;
        }
        if self.wanted.as_ref().map(|w| &w.spec) != Some(&s.spec) {
            self.wanted = Some(s);
            self.retry_at = Some(Instant::now());
            self.backoff = RETRY_FIRST;
        }
    }

    fn build(
        &self,
        inv: &Inventory,
        tainted: &BTreeMap<String, DeviceTaint>,
    ) -> (ResourceSlice, Vec<String>) {
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
                        warn!("cannot read Node {} ({e}): publishing the ResourceSlice without an owner", self.node);
                        self.no_owner_warned = true;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if self.published.is_none() {
            self.adopt()?;
        } else if verify {
            self.check()?;
        }
        let Some(wanted) = self.wanted.clone() else {
            return Ok(());
        };
        let spec = spec_value(&wanted);
        if self.published.as_ref().is_some_and(|p| p.spec == spec) {
            return Ok(());
        }
        self.write(wanted)
    }

    /// Takes over the slices of this node and driver a previous instance left: the first is
    /// ours to update, any others go (one pool, one slice).
    fn adopt(&mut self) -> Result<(), kube::Error> {
        let list: Value = self.kube.get(&self.selector_path())?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let mut items = items.into_iter();
        if let Some(first) = items.next() {
            let generation = first["spec"]["pool"]["generation"].as_i64().unwrap_or(0);
            self.generation = self.generation.max(generation);
            self.published = Some(stored(&first, spec_of(&first)));
            debug!(
                "found ResourceSlice {} of a previous instance",
                first["metadata"]["name"].as_str().unwrap_or("?")
            );
        }
        for extra in items {
            if let Some(name) = extra["metadata"]["name"].as_str() {
                info!("deleting extra ResourceSlice {name} of this node");
                self.kube
                    .delete(&format!("{SLICES}/{}", kube::escape(name)))?;
            }
        }
        Ok(())
    }

    /// Is our slice still there, as we wrote it? The kubelet deletes it at its start and after
    /// we disconnect; anyone with the rights may change it.
    fn check(&mut self) -> Result<(), kube::Error> {
        let Some(p) = &self.published else {
            return Ok(());
        };
        match self
            .kube
            .get::<Value>(&format!("{SLICES}/{}", kube::escape(&p.name)))
        {
            Ok(s) => {
                if s["metadata"]["resourceVersion"].as_str() != Some(p.resource_version.as_str()) {
                    warn!(
                        "ResourceSlice {} was changed by someone else: writing ours again",
                        p.name
                    );
                    // A spec no wanted slice equals: the next step writes ours.
                    self.published = Some(stored(&s, Value::Null));
                }
                Ok(())
            }
            Err(e) if e.code() == Some(404) => {
                warn!(
                    "ResourceSlice {} is gone (the kubelet wipes a node's slices when it starts): publishing it again",
                    p.name
                );
                self.published = None;
                self.recreated += 1;
                // The Node may have been made again (the garbage collector deletes a slice
                // whose owner is gone): read its UID again.
                self.node_uid = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn write(&mut self, mut wanted: ResourceSlice) -> Result<(), kube::Error> {
        self.generation += 1;
        wanted.spec.pool.generation = self.generation;
        if let Some(uid) = &self.node_uid {
            wanted.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".to_string(),
                kind: "Node".to_string(),
                name: self.node.clone(),
                uid: uid.clone(),
                controller: Some(true),
                ..Default::default()
            }]);
        }
        let sent = spec_value(&wanted);
        let result = match &self.published {
            Some(p) => {
                wanted.metadata.name = Some(p.name.clone());
                wanted.metadata.generate_name = None;
                wanted.metadata.resource_version = Some(p.resource_version.clone());
                self.kube
                    .put::<_, Value>(&format!("{SLICES}/{}", kube::escape(&p.name)), &wanted)
            }
            None => self.kube.post::<_, Value>(SLICES, &wanted),
        };
        match result {
            Ok(answer) => {
                self.writes += 1;
                info!(
                    "published ResourceSlice {} (generation {}, {} device(s))",
                    answer["metadata"]["name"].as_str().unwrap_or("?"),
                    self.generation,
                    wanted.spec.devices.as_ref().map_or(0, Vec::len)
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
                self.published = Some(stored(&answer, sent));
                Ok(())
            }
            Err(e) => {
                // 404: wiped since we looked; 409: changed since we looked (optimistic
                // concurrency). Either way, look again before the next write.
                if matches!(e.code(), Some(404 | 409)) {
                    self.published = None;
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

    /// The published slice's name, if any.
    pub fn name(&self) -> Option<&str> {
        self.published.as_ref().map(|p| p.name.as_str())
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
