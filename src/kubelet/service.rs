//! The `v1beta1.DevicePlugin` service. Handlers run on grpcio's completion-queue threads, so each
//! answers from memory or a short directory listing and never waits on anything.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use grpcio::{RpcContext, RpcStatus, RpcStatusCode, ServerStreamingSink, UnarySink};
use log::{debug, info, warn};

use crate::config::Config;
use crate::host::health::{Mode, PortMonitor};
use crate::host::nodes::{Inventory, Selection};
use crate::host::select::Selector;
use crate::host::{self, Assessment, Grant, Host};
use crate::kubelet::api;
use crate::kubelet::stream::{self, Hub};
use crate::resource::{cdi, Devices, RequestError};

/// What the plugin serves; shared by every handler of one server.
#[derive(Debug)]
pub struct Settings {
    /// Where device nodes are looked for (`/` on a host, the host's `/` mount in a pod).
    pub host_root: PathBuf,
    /// Where sysfs is seen, for the HCAs (`/sys`: a container's own sysfs shows the host's HCAs).
    pub sysfs: PathBuf,
    pub selection: Selection,
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
    cdi_ready: std::sync::atomic::AtomicBool,
    /// The health rule and hold-down (for one-off assessments).
    pub health: Mode,
    pub hold_down: Duration,
    /// The last discovery error, so a lasting one is logged at warn once, not on every scan.
    last_error: Mutex<Option<String>>,
    /// What sysfs could not tell at the last scan, so it is logged (at debug) once.
    last_notes: Mutex<Vec<String>>,
}

impl Settings {
    /// What one resource's server serves, from its configuration.
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            host_root: cfg.host_root.clone(),
            sysfs: cfg.sysfs.clone(),
            selection: cfg.selection(),
            selector: cfg.selector.clone(),
            taken: cfg.taken.clone(),
            resource: cfg.resource(),
            resource_name: cfg.resource_name.clone(),
            cdi: cfg.cdi.then_some(CdiAnswer {
                device_specs: !cfg.cdi_only,
            }),
            cdi_ready: std::sync::atomic::AtomicBool::new(false),
            health: cfg.health,
            hold_down: cfg.hold_down,
            last_error: Mutex::new(None),
            last_notes: Mutex::new(Vec::new()),
        }
    }

    /// Whether this resource's CDI spec is written (set by the daemon).
    pub fn set_cdi_ready(&self, ready: bool) {
        self.cdi_ready
            .store(ready, std::sync::atomic::Ordering::Release);
    }

    /// The device nodes granted now (what Allocate hands out), or why discovery failed (an
    /// unreadable device directory, too many open files): a pod must not be told "no driver"
    /// when the cause is something else.
    pub fn granted(&self) -> Result<(Host, Grant), String> {
        self.try_scan().map(|h| {
            let g = host::grant_except(&h, &self.selector, &self.taken);
            (h, g)
        })
    }

    /// Reads the host now and assesses it with a fresh port monitor (no hold-down history):
    /// what a one-off answer such as a preferred allocation needs.
    pub fn assess_now(&self) -> Assessment {
        let mut monitor = PortMonitor::new(self.hold_down);
        host::assess(
            self.scan(),
            &self.selector,
            &self.taken,
            self.health,
            &mut monitor,
            Instant::now(),
        )
    }

    /// Reads the host now. A device directory that cannot be listed counts as no devices (the
    /// resource turns Unhealthy) and is logged, so the plugin keeps serving.
    pub fn scan(&self) -> Host {
        self.try_scan().unwrap_or_else(|_| Host {
            nodes: Inventory::default(),
            hcas: host::sysfs::read(&self.sysfs),
        })
    }

    /// Reads the host now; a lasting error is logged at warn once, then at debug.
    fn try_scan(&self) -> Result<Host, String> {
        let result = host::scan(&self.host_root, &self.sysfs, self.selection);
        if let Ok(h) = &result {
            let mut last = self
                .last_notes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *last != h.hcas.notes {
                for note in &h.hcas.notes {
                    debug!("sysfs: cannot read {note}; that much stays unknown");
                }
                last.clone_from(&h.hcas.notes);
            }
        }
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(h) => {
                if last.take().is_some() {
                    info!("device discovery works again");
                }
                Ok(h)
            }
            Err(e) => {
                let text = e.to_string();
                if last.as_deref() == Some(text.as_str()) {
                    debug!("device discovery still failing: {text}");
                } else {
                    warn!("device discovery failed: {text}; advertising no device nodes");
                    *last = Some(text.clone());
                }
                Err(text)
            }
        }
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
        let result = match &self.settings.resource {
            // Shared devices need no reading of the host.
            Devices::Shared(r) => r.preferred(&req),
            per_hca => per_hca.preferred(&req, &self.settings.assess_now()),
        }
        .map_err(status);
        reply(&ctx, sink, result, "GetPreferredAllocation");
    }

    fn allocate(
        &mut self,
        ctx: RpcContext<'_>,
        req: api::AllocateRequest,
        sink: UnarySink<api::AllocateResponse>,
    ) {
        // Read live: a node added or removed since the last ListAndWatch message counts.
        let result = match self.settings.granted() {
            Ok((h, g)) => {
                let result = self
                    .settings
                    .resource
                    .allocate(&req, &h, &g)
                    .map(|resp| match self.settings.cdi {
                        // Without a written spec, CDI names would not resolve: device specs.
                        Some(how)
                            if self
                                .settings
                                .cdi_ready
                                .load(std::sync::atomic::Ordering::Acquire) =>
                        {
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
            Err(why) => Err(status(RequestError::Discovery(why))),
        };
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
