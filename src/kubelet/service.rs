//! The `v1beta1.DevicePlugin` service. Handlers run on grpcio's completion-queue threads, so each
//! answers from memory (the daemon's latest assessment of the host, [`Settings::publish`]) and
//! never reads the filesystem or waits on anything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use grpcio::{RpcContext, RpcStatus, RpcStatusCode, ServerStreamingSink, UnarySink};
use log::{debug, warn};

use crate::config::Config;
use crate::host::select::Selector;
use crate::host::Assessment;
use crate::kubelet::api;
use crate::kubelet::stream::{self, Hub};
use crate::observe::Observer;
use crate::resource::{cdi, Devices, RequestError};

/// What the plugin serves; shared by every handler of one server.
#[derive(Debug)]
pub struct Settings {
    /// Which HCAs are granted.
    pub selector: Selector,
    /// Per-HCA resources declared before this one, and what they select.
    pub taken: Vec<(String, Selector)>,
    pub resource: Devices,
    /// The resource name (the CDI kind).
    pub resource_name: String,
    /// With `--cdi`: answer with CDI names (and DeviceSpecs too, unless `--cdi-only`).
    pub cdi: Option<CdiAnswer>,
    /// The CDI spec is on disk as it must be: CDI names resolve. Set by the daemon, which
    /// watches the spec; while it is not, Allocate answers with device specs alone.
    cdi_ready: AtomicBool,
    /// What the handlers answer from: the daemon's latest assessment, published after every
    /// reading of the host (the same one the kubelet's list was made from).
    current: Mutex<Option<Arc<Served>>>,
    /// Where calls are counted and timed.
    pub observer: Arc<Observer>,
}

/// One assessment of the host as the handlers see it.
#[derive(Debug)]
pub struct Served {
    pub assessment: Assessment,
    /// Why device discovery failed, if it did: Allocate says so rather than "no driver".
    pub error: Option<String>,
}

impl Settings {
    /// What one resource's server serves, from its configuration.
    pub fn from_config(cfg: &Config, observer: Arc<Observer>) -> Settings {
        Settings {
            selector: cfg.selector.clone(),
            taken: cfg.taken.clone(),
            resource: cfg.resource(),
            resource_name: cfg.resource_name.clone(),
            cdi: cfg.cdi.then_some(CdiAnswer {
                device_specs: !cfg.cdi_only,
            }),
            cdi_ready: AtomicBool::new(false),
            current: Mutex::new(None),
            observer,
        }
    }

    /// Whether this resource's CDI spec is written (set by the daemon).
    pub fn set_cdi_ready(&self, ready: bool) {
        self.cdi_ready.store(ready, Ordering::Release);
    }

    /// Makes `served` what the handlers answer from.
    pub fn publish(&self, served: Arc<Served>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(served);
    }

    /// The latest assessment, if the daemon has made one.
    fn current(&self) -> Result<Arc<Served>, RequestError> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| RequestError::Discovery("the host has not been read yet".into()))
    }
}

/// How Allocate answers in CDI mode.
#[derive(Clone, Copy, Debug)]
pub struct CdiAnswer {
    /// Also the DeviceSpecs, so that a runtime without CDI (which ignores CDI names without a
    /// word) still gives the container its devices (the default; off with `--cdi-only`).
    pub device_specs: bool,
}

/// Turns an Allocate answer into its CDI form: each container gets the CDI names of the IDs it
/// asked for; the DeviceSpecs stay unless `--cdi-only` (envs stay: they are in no spec).
fn as_cdi(
    mut resp: api::AllocateResponse,
    req: &api::AllocateRequest,
    kind: &str,
    how: CdiAnswer,
) -> api::AllocateResponse {
    for (c, creq) in resp
        .container_responses
        .iter_mut()
        .zip(&req.container_requests)
    {
        let mut names: Vec<&String> = creq.devices_ids.iter().collect();
        names.sort();
        names.dedup();
        c.cdi_devices = names
            .into_iter()
            .map(|id| {
                let mut d = api::CDIDevice::new();
                d.name = cdi::qualified(kind, id);
                d
            })
            .collect();
        if !how.device_specs {
            c.devices.clear();
        }
    }
    resp
}

/// The options we register with and answer `GetDevicePluginOptions` with.
pub fn options() -> api::DevicePluginOptions {
    let mut o = api::DevicePluginOptions::new();
    o.pre_start_required = false;
    o.get_preferred_allocation_available = true;
    o
}

#[derive(Clone)]
pub struct Plugin {
    settings: Arc<Settings>,
    hub: Arc<Hub>,
}

impl Plugin {
    /// The service of one serving generation, streaming from `hub`.
    pub fn new(settings: Arc<Settings>, hub: Arc<Hub>) -> Plugin {
        Plugin { settings, hub }
    }
}

fn reply<T>(ctx: &RpcContext<'_>, sink: UnarySink<T>, result: Result<T, RpcStatus>, rpc: &str) {
    let rpc = rpc.to_string();
    let sent = match result {
        Ok(msg) => sink.success(msg),
        Err(status) => {
            warn!("{rpc} refused: {}", status.message());
            sink.fail(status)
        }
    };
    // The send completes on the completion queue; a client that left meanwhile is only news.
    ctx.spawn(async move {
        if let Err(e) = sent.await {
            debug!("{rpc} reply not delivered: {e}");
        }
    });
}

/// A gRPC status code's canonical name (`jarvice_rdma_requests_total`'s `code` label).
pub fn code_name(code: RpcStatusCode) -> &'static str {
    match code {
        RpcStatusCode::OK => "OK",
        RpcStatusCode::CANCELLED => "Canceled",
        RpcStatusCode::INVALID_ARGUMENT => "InvalidArgument",
        RpcStatusCode::DEADLINE_EXCEEDED => "DeadlineExceeded",
        RpcStatusCode::NOT_FOUND => "NotFound",
        RpcStatusCode::ALREADY_EXISTS => "AlreadyExists",
        RpcStatusCode::PERMISSION_DENIED => "PermissionDenied",
        RpcStatusCode::RESOURCE_EXHAUSTED => "ResourceExhausted",
        RpcStatusCode::FAILED_PRECONDITION => "FailedPrecondition",
        RpcStatusCode::ABORTED => "Aborted",
        RpcStatusCode::UNIMPLEMENTED => "Unimplemented",
        RpcStatusCode::INTERNAL => "Internal",
        RpcStatusCode::UNAVAILABLE => "Unavailable",
        _ => "Unknown",
    }
}

/// Counts and times one answered call.
fn record<T>(
    observer: &Observer,
    rpc: &'static str,
    start: Instant,
    result: &Result<T, RpcStatus>,
) {
    let code = match result {
        Ok(_) => RpcStatusCode::OK,
        Err(s) => s.code(),
    };
    observer.request(rpc, code_name(code), start.elapsed());
}

fn status(e: RequestError) -> RpcStatus {
    let code = match e {
        RequestError::NoVerbs | RequestError::Discovery(_) => RpcStatusCode::UNAVAILABLE,
        RequestError::TooLarge(_) => RpcStatusCode::RESOURCE_EXHAUSTED,
        _ => RpcStatusCode::INVALID_ARGUMENT,
    };
    RpcStatus::with_message(code, e.to_string())
}

impl api::DevicePlugin for Plugin {
    fn get_device_plugin_options(
        &mut self,
        ctx: RpcContext<'_>,
        _req: api::Empty,
        sink: UnarySink<api::DevicePluginOptions>,
    ) {
        reply(&ctx, sink, Ok(options()), "GetDevicePluginOptions");
    }

    fn list_and_watch(
        &mut self,
        ctx: RpcContext<'_>,
        _req: api::Empty,
        sink: ServerStreamingSink<api::ListAndWatchResponse>,
    ) {
        // Each stream owns a thread: bound them, so a client that opens thousands cannot take
        // the process's threads and memory (the kubelet holds one; probes open one each).
        let open = self.hub.open_streams();
        if open >= stream::MAX_STREAMS {
            let msg = format!(
                "{open} ListAndWatch streams are open; at most {} are served",
                stream::MAX_STREAMS
            );
            warn!("ListAndWatch refused: {msg}");
            let failed = sink.fail(RpcStatus::with_message(
                RpcStatusCode::RESOURCE_EXHAUSTED,
                msg,
            ));
            ctx.spawn(async move {
                let _ = failed.await;
            });
            return;
        }
        stream::spawn(Arc::clone(&self.hub), sink, ctx.peer());
    }

    fn get_preferred_allocation(
        &mut self,
        ctx: RpcContext<'_>,
        req: api::PreferredAllocationRequest,
        sink: UnarySink<api::PreferredAllocationResponse>,
    ) {
        let start = Instant::now();
        let result = match &self.settings.resource {
            // Shared devices need no reading of the host.
            Devices::Shared(r) => r.preferred(&req),
            per_hca => self
                .settings
                .current()
                .and_then(|now| per_hca.preferred(&req, &now.assessment)),
        }
        .map_err(status);
        record(
            &self.settings.observer,
            "GetPreferredAllocation",
            start,
            &result,
        );
        reply(&ctx, sink, result, "GetPreferredAllocation");
    }

    fn allocate(
        &mut self,
        ctx: RpcContext<'_>,
        req: api::AllocateRequest,
        sink: UnarySink<api::AllocateResponse>,
    ) {
        let start = Instant::now();
        // The daemon's latest reading: it reads again within milliseconds of any change under
        // /dev (inotify), so a node added or removed since the last list counts.
        let now = self.settings.current().and_then(|now| match &now.error {
            Some(why) => Err(RequestError::Discovery(why.clone())),
            None => Ok(now),
        });
        let result = match now {
            Ok(now) => {
                let a = &now.assessment;
                let result = self
                    .settings
                    .resource
                    .allocate(&req, &a.host, &a.grant)
                    .map(|resp| match self.settings.cdi {
                        // Without the spec on disk, CDI names would not resolve: device specs.
                        Some(how) if self.settings.cdi_ready.load(Ordering::Acquire) => {
                            as_cdi(resp, &req, &self.settings.resource_name, how)
                        }
                        _ => resp,
                    })
                    .map_err(status);
                if let Ok(resp) = &result {
                    debug!(
                        "Allocate: {} container(s), {} device node(s) in the first",
                        resp.container_responses.len(),
                        resp.container_responses
                            .first()
                            .map_or(0, |c| c.devices.len())
                    );
                }
                result
            }
            Err(e) => Err(status(e)),
        };
        record(&self.settings.observer, "Allocate", start, &result);
        if result.is_ok() {
            let granted: usize = req
                .container_requests
                .iter()
                .map(|c| c.devices_ids.len())
                .sum();
            let r = self.settings.resource_name.as_str();
            self.settings
                .observer
                .add("allocated_devices", &[("resource", r)], granted as u64);
        }
        reply(&ctx, sink, result, "Allocate");
    }

    fn pre_start_container(
        &mut self,
        ctx: RpcContext<'_>,
        _req: api::PreStartContainerRequest,
        sink: UnarySink<api::PreStartContainerResponse>,
    ) {
        // Never called: we register with pre_start_required = false. Answer empty regardless.
        reply(
            &ctx,
            sink,
            Ok(api::PreStartContainerResponse::new()),
            "PreStartContainer",
        );
    }
}
