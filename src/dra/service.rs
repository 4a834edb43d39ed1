//! The kubelet-facing gRPC services of the DRA front-end: plugin registration (on
//! `<registry>/<driver>-reg.sock`), DRAPlugin v1 and resource health (on `dra.sock`).
//! Handlers run on grpcio's completion-queue threads and never block there: GetInfo answers
//! from memory, prepare and unprepare (which may wait on the API server) run on a worker
//! thread of their own, and health streams on theirs ([`crate::kubelet::stream`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grpcio::{RpcContext, RpcStatus, RpcStatusCode, ServerStreamingSink, UnarySink};
use log::{debug, info, warn};

use crate::dra::claims::{ClaimRef, Claims, MAX_CLAIMS};
use crate::dra::devices::Inventory;
use crate::dra::proto::{dra, dra_health, pluginregistration as reg, SUPPORTED_SERVICES};
use crate::kube::Kube;
use crate::kubelet::stream::{self, Hub};
use crate::observe::Observer;
use crate::sys::EventFd;
use crate::wake;

/// The kubelet gives a prepare 45 s; claims not reached within this budget get an error entry
/// (the kubelet retries at the pod's next sync) so that the call is always answered in time.
pub const PREPARE_BUDGET: Duration = Duration::from_secs(30);
/// No request to the API server may end later than this after the call arrived (the
/// kubelet's timeout is 45 s).
pub const REQUESTS_END: Duration = Duration::from_secs(40);
/// The kubelet marks a device Unknown when not refreshed within this (we resend every 10 s).
pub const HEALTH_TIMEOUT_SECS: i64 = 30;

/// Threads that run prepares: TLS and JSON need more stack than the stream threads' 256 KiB
/// (a claim nested to serde_json's depth limit overflows that in a debug build), and a fixed
/// set of long-lived threads leaves nothing behind per call (under musl each thread that
/// touches gRPC leaks its thread-locals at exit: see `workers.rs`).
pub const PREPARE_THREADS: usize = 4;
const PREPARE_STACK: usize = 1 << 20;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The prepare threads' queue.
pub struct Preparers {
    tx: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl Preparers {
    /// Starts the threads (idle, blocked on the queue, until a prepare comes).
    pub fn start() -> std::io::Result<Preparers> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..PREPARE_THREADS {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("prepare-{i}"))
                .stack_size(PREPARE_STACK)
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Preparers { tx: Mutex::new(tx) })
    }

    fn run(&self, job: Job) -> Result<(), String> {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job)
            .map_err(|_| "the prepare threads are gone".to_string())
    }
}

/// What the handlers share with the main loop.
pub struct Shared {
    pub driver: String,
    pub node: String,
    /// The `dra.sock` path we register.
    pub endpoint: String,
    pub kube: Kube,
    pub claims: Claims,
    /// The devices as last published (the main loop replaces it after every reading).
    inventory: Mutex<Arc<Inventory>>,
    /// Raised when a kubelet registered us (a kubelet start: republish).
    pub registered: Arc<EventFd>,
    /// Health streams.
    pub health: Arc<Hub<dra_health::NodeWatchResourcesResponse>>,
    preparers: Preparers,
    pub observer: Arc<Observer>,
    /// Registrations the kubelet accepted (after the first, each is a kubelet restart).
    registrations: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// `wakes`: raised when a kubelet registered us, and when a health stream ended.
    pub fn new(
        driver: &str,
        node: &str,
        endpoint: String,
        kube: Kube,
        claims: Claims,
        wakes: (Arc<EventFd>, Arc<EventFd>),
        observer: Arc<Observer>,
    ) -> std::io::Result<Shared> {
        let (registered, stream_left) = wakes;
        Ok(Shared {
            preparers: Preparers::start()?,
            driver: driver.to_string(),
            node: node.to_string(),
            endpoint,
            kube,
            claims,
            inventory: Mutex::new(Arc::new(Inventory::default())),
            registered,
            health: Hub::named(
                "NodeWatchResources",
                dra_health::NodeWatchResourcesResponse::new(),
                stream_left,
            ),
            observer,
            registrations: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A new registration socket: no kubelet has registered what it serves yet.
    pub fn unregistered(&self) {
        for name in self.observer.resources() {
            self.observer.serving(&name, true, false);
        }
    }

    /// Tells the observer how many devices of each resource prepared claims hold.
    pub fn report_allocated(&self) {
        let inv = self.inventory();
        let mut per: BTreeMap<String, u64> = BTreeMap::new();
        for name in self.claims.held_devices() {
            if let Some(d) = inv.get(&name) {
                *per.entry(d.resource.clone()).or_insert(0) += 1;
            }
        }
        self.observer.allocated(&per);
    }

    /// The kubelet told us whether it registered us (every resource rides one registration).
    fn registration(&self, accepted: bool, why: &str) {
        for name in self.observer.resources() {
            self.observer.registration(&name, accepted, why);
            self.observer.serving(&name, true, accepted);
        }
        if accepted
            && self
                .registrations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                > 0
        {
            self.observer.count("kubelet_restarts", &[]);
        }
    }

    pub fn set_inventory(&self, inv: Arc<Inventory>) {
        *self
            .inventory
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = inv;
    }

    pub fn inventory(&self) -> Arc<Inventory> {
        Arc::clone(
            &self
                .inventory
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Publishes the health of every device to the streams (the whole list, fresh timestamps).
    pub fn publish_health(&self, inv: &Inventory) {
        self.health.publish(health_list(&self.node, inv));
    }
}

/// The health message for `inv`: every device, Healthy or Unhealthy with the reason.
pub fn health_list(pool: &str, inv: &Inventory) -> dra_health::NodeWatchResourcesResponse {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut resp = dra_health::NodeWatchResourcesResponse::new();
    resp.devices = inv
        .devices
        .iter()
        .map(|d| {
            let mut h = dra_health::DeviceHealth::new();
            let mut id = dra_health::DeviceIdentifier::new();
            id.pool_name = pool.to_string();
            id.device_name = d.name.clone();
            h.device = Some(id).into();
            h.health = if d.healthy {
                dra_health::HealthStatus::HEALTHY
            } else {
                dra_health::HealthStatus::UNHEALTHY
            }
            .into();
            h.last_updated_time = now;
            h.health_check_timeout_seconds = HEALTH_TIMEOUT_SECS;
            h.message = d.reason.clone();
            h
        })
        .collect();
    resp
}

/// `pluginregistration.Registration`.
#[derive(Clone)]
pub struct Registration {
    pub shared: Arc<Shared>,
}

impl reg::Registration for Registration {
    fn get_info(
        &mut self,
        ctx: RpcContext,
        _req: reg::InfoRequest,
        sink: UnarySink<reg::PluginInfo>,
    ) {
        let mut info = reg::PluginInfo::new();
        info.type_ = "DRAPlugin".to_string();
        info.name.clone_from(&self.shared.driver);
        info.endpoint.clone_from(&self.shared.endpoint);
        info.supported_versions = SUPPORTED_SERVICES.iter().map(|s| s.to_string()).collect();
        debug!("GetInfo from {}", ctx.peer());
        reply(&ctx, sink.success(info), "GetInfo");
    }

    fn notify_registration_status(
        &mut self,
        ctx: RpcContext,
        req: reg::RegistrationStatus,
        sink: UnarySink<reg::RegistrationStatusResponse>,
    ) {
        if req.plugin_registered {
            info!(
                "registered with the kubelet as DRA driver {}",
                self.shared.driver
            );
            self.shared.registered.notify();
            self.shared.registration(true, "");
        } else {
            let why = req.error.chars().take(500).collect::<String>();
            warn!("the kubelet refused our registration: {why}");
            self.shared.registration(false, &why);
        }
        reply(
            &ctx,
            sink.success(reg::RegistrationStatusResponse::new()),
            "NotifyRegistrationStatus",
        );
    }
}

fn reply(ctx: &RpcContext<'_>, sent: grpcio::UnarySinkResult, rpc: &'static str) {
    ctx.spawn(async move {
        if let Err(e) = sent.await {
            debug!("{rpc} reply not delivered: {e}");
        }
    });
}

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin` and the health service.
#[derive(Clone)]
pub struct Plugin {
    pub shared: Arc<Shared>,
}

impl dra::DraPlugin for Plugin {
    fn node_prepare_resources(
        &mut self,
        ctx: RpcContext,
        req: dra::NodePrepareResourcesRequest,
        sink: UnarySink<dra::NodePrepareResourcesResponse>,
    ) {
        let shared = Arc::clone(&self.shared);
        let peer = ctx.peer();
        // The budget counts from now: a call that waited for a free thread has less of it.
        let arrived = Instant::now();
        let job = move || {
            let (resp, granted) = prepare_all(&shared, &req.claims, arrived);
            let obs = &shared.observer;
            record_claims(obs, "NodePrepareResources", &resp.claims, |c| {
                c.error.is_empty()
            });
            shared.report_allocated();
            obs.request("NodePrepareResources", "OK", arrived.elapsed());
            let inv = shared.inventory();
            for name in granted {
                if let Some(dev) = inv.get(&name) {
                    obs.count("allocated_devices", &[("resource", dev.resource.as_str())]);
                }
            }
            finish(sink.success(resp), "NodePrepareResources", &peer);
        };
        if let Err(e) = self.shared.preparers.run(Box::new(job)) {
            // The sink went with the job and its drop cancels the call: the kubelet retries.
            warn!("cannot prepare: {e}");
        }
    }

    fn node_unprepare_resources(
        &mut self,
        ctx: RpcContext,
        req: dra::NodeUnprepareResourcesRequest,
        sink: UnarySink<dra::NodeUnprepareResourcesResponse>,
    ) {
        // Files only, no API server: answered here.
        let start = Instant::now();
        let mut resp = dra::NodeUnprepareResourcesResponse::new();
        for c in &req.claims {
            let mut one = dra::NodeUnprepareResourceResponse::new();
            if let Err(e) = self.shared.claims.unprepare(&claim_ref(c)) {
                warn!(
                    "unprepare of claim {}/{}: {e}",
                    printable(&c.namespace),
                    printable(&c.name)
                );
                one.error = e;
            }
            resp.claims.insert(c.uid.clone(), one);
        }
        let obs = &self.shared.observer;
        record_claims(obs, "NodeUnprepareResources", &resp.claims, |c| {
            c.error.is_empty()
        });
        self.shared.report_allocated();
        obs.request("NodeUnprepareResources", "OK", start.elapsed());
        reply(&ctx, sink.success(resp), "NodeUnprepareResources");
    }
}

/// Counts the claims of one call by result.
fn record_claims<T>(
    observer: &Observer,
    rpc: &'static str,
    claims: &std::collections::HashMap<String, T>,
    ok: impl Fn(&T) -> bool,
) {
    let good = claims.values().filter(|c| ok(c)).count() as u64;
    let bad = claims.len() as u64 - good;
    for (result, n) in [("ok", good), ("error", bad)] {
        if n > 0 {
            observer.add("claims", &[("rpc", rpc), ("result", result)], n);
        }
    }
}

/// A prepare answered from a worker thread: wait (briefly) for the send, to log a failure.
fn finish(sent: grpcio::UnarySinkResult, rpc: &str, peer: &str) {
    match wake::block_on(sent, Some(Duration::from_secs(5))) {
        Some(Ok(())) => {}
        Some(Err(e)) => debug!("{rpc} reply to {peer} not delivered: {e}"),
        None => debug!("{rpc} reply to {peer} still on its way"),
    }
}

/// Every claim gets an entry: its devices or its error, never a failed call. Also returns the
/// devices this call newly granted (not those of a claim prepared before, nor admin access).
fn prepare_all(
    shared: &Shared,
    claims: &[dra::Claim],
    start: Instant,
) -> (dra::NodePrepareResourcesResponse, Vec<String>) {
    let mut granted = Vec::new();
    let inv = shared.inventory();
    let mut resp = dra::NodePrepareResourcesResponse::new();
    let mut results: BTreeMap<String, dra::NodePrepareResourceResponse> = BTreeMap::new();
    for (i, c) in claims.iter().enumerate() {
        if results.contains_key(&c.uid) {
            continue;
        }
        let mut one = dra::NodePrepareResourceResponse::new();
        let outcome = if i >= MAX_CLAIMS {
            Err(format!("more than {MAX_CLAIMS} claims in one call"))
        } else if start.elapsed() >= PREPARE_BUDGET {
            Err("not reached in this call's time; the kubelet tries again".to_string())
        } else {
            shared
                .claims
                .prepare(&shared.kube, &inv, &claim_ref(c), start + REQUESTS_END)
                .map(|o| {
                    if o.new {
                        let held = o.devices.iter().filter(|d| !d.admin);
                        granted.extend(held.map(|d| d.device.clone()));
                    }
                    o.devices
                })
        };
        match outcome {
            Ok(devices) => {
                one.devices = devices
                    .into_iter()
                    .map(|d| {
                        let mut x = dra::Device::new();
                        // The kubelet matches containers to results by the request's name: a
                        // subrequest (`rdma/one-hca`, from `firstAvailable`) answers for its
                        // request (`rdma`), as the Go helper strips it (`BaseRequestRef`).
                        let base = d.request.split('/').next().unwrap_or_default();
                        x.request_names = vec![base.to_string()];
                        x.pool_name = d.pool;
                        x.device_name = d.device;
                        x.cdi_device_ids = vec![d.cdi_id];
                        x
                    })
                    .collect();
            }
            Err(e) => {
                warn!(
                    "prepare of claim {}/{}: {e}",
                    printable(&c.namespace),
                    printable(&c.name)
                );
                one.error = e;
            }
        }
        results.insert(c.uid.clone(), one);
    }
    resp.claims = results.into_iter().collect();
    (resp, granted)
}

fn claim_ref(c: &dra::Claim) -> ClaimRef {
    ClaimRef {
        namespace: c.namespace.clone(),
        name: c.name.clone(),
        uid: c.uid.clone(),
    }
}

/// A name from a request, safe for a log line (control characters escaped, bounded).
fn printable(s: &str) -> String {
    let mut out = format!("{:?}", s.chars().take(100).collect::<String>());
    if s.chars().count() > 100 {
        out.push('…');
    }
    out
}

impl dra_health::DraResourceHealth for Plugin {
    fn node_watch_resources(
        &mut self,
        ctx: RpcContext,
        _req: dra_health::NodeWatchResourcesRequest,
        sink: ServerStreamingSink<dra_health::NodeWatchResourcesResponse>,
    ) {
        if self.shared.health.open_streams() >= stream::MAX_STREAMS {
            let failed = sink.fail(RpcStatus::with_message(
                RpcStatusCode::RESOURCE_EXHAUSTED,
                "too many health streams".into(),
            ));
            ctx.spawn(async move {
                let _ = failed.await;
            });
            return;
        }
        stream::spawn(Arc::clone(&self.shared.health), sink, ctx.peer());
    }
}
