//! A fake kubelet for the DRA front-end, behaving as the 1.36 kubelet does:
//! - its plugin watcher finds `<driver>-reg.sock` in the registry dir (names starting with `.`
//!   are ignored: `pkg/kubelet/pluginmanager/pluginwatcher/plugin_watcher.go`), dials it, calls
//!   `GetInfo` with a 1 s timeout, takes the handler of `type` (`DRAPlugin`), picks the first
//!   service of `supported_versions` it knows and answers `NotifyRegistrationStatus`
//!   (`pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go`,
//!   `pkg/kubelet/cm/dra/plugin/dra_plugin_manager.go: validateSupportedServices`);
//! - it calls `NodePrepareResources`/`NodeUnprepareResources` v1 on the registered endpoint
//!   with a 45 s timeout (`pkg/kubelet/cm/dra/manager.go`);
//! - it opens `v1alpha1.DRAResourceHealth/NodeWatchResources` and reads whole lists.
//!
//! The watcher here polls the directory every 20 ms (the kubelet uses fsnotify plus one walk at
//! start); everything else goes over real gRPC on real unix sockets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures_core::Stream;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, Environment};
use rdma_plugin::dra::proto::{dra, dra_health, pluginregistration as reg};

/// The flags that point the plugin's DRA front-end at `host`'s temp tree (registry, plugins and
/// CDI dirs beside the host root) and at `api`, as node `node`.
pub fn plugin_args(host: &super::Host, api: &super::fake_api::FakeApi, node: &str) -> Vec<String> {
    let tmp = host.tmp.path();
    let mut args: Vec<String> = vec![
        "--frontend".into(),
        "dra".into(),
        "--node-name".into(),
        node.into(),
        "--kube-api".into(),
        api.url(),
        "--kube-token-file".into(),
        api.token_file().display().to_string(),
        "--kubelet-registry-dir".into(),
        tmp.join("registry").display().to_string(),
        "--kubelet-plugins-dir".into(),
        tmp.join("kplugins").display().to_string(),
        "--cdi-dir".into(),
        tmp.join("cdi").display().to_string(),
    ];
    if let Some(ca) = api.ca_file() {
        args.push("--kube-ca-file".into());
        args.push(ca.display().to_string());
    }
    args
}

/// Services this kubelet knows, in its order of preference (1.36: v1, then v1beta1).
const KNOWN: [&str; 2] = ["v1.DRAPlugin", "v1beta1.DRAPlugin"];

/// What one registration told us.
#[derive(Clone, Debug)]
pub struct Registered {
    pub info: reg::PluginInfo,
    pub chosen: String,
    pub socket: PathBuf,
}

pub struct DraKubelet {
    env: Arc<Environment>,
    pub registry: PathBuf,
    registrations: Arc<Mutex<Vec<Registered>>>,
    client: Mutex<Option<(String, dra::DraPluginClient)>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    watcher: Option<thread::JoinHandle<()>>,
}

fn env() -> Arc<Environment> {
    Arc::new(
        EnvBuilder::new()
            .cq_count(1)
            .name_prefix("dra-kubelet")
            .build(),
    )
}

fn channel(env: &Arc<Environment>, socket: &Path) -> grpcio::Channel {
    ChannelBuilder::new(Arc::clone(env))
        .default_authority("localhost")
        .use_local_subchannel_pool(true)
        .connect(&format!("unix:{}", socket.display()))
}

impl DraKubelet {
    /// Starts watching `registry` (created if missing, as the kubelet does at its start).
    pub fn start(registry: &Path) -> DraKubelet {
        std::fs::create_dir_all(registry).unwrap();
        let env = env();
        let registrations = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let env = Arc::clone(&env);
            let registrations = Arc::clone(&registrations);
            let stop = Arc::clone(&stop);
            let dir = registry.to_path_buf();
            thread::spawn(move || watch(&env, &dir, &registrations, &stop))
        };
        DraKubelet {
            env,
            registry: registry.to_path_buf(),
            registrations,
            client: Mutex::new(None),
            stop,
            watcher: Some(watcher),
        }
    }

    /// Registrations so far.
    pub fn registrations(&self) -> Vec<Registered> {
        self.registrations.lock().unwrap().clone()
    }

    /// Waits for the `n`th registration (1-based).
    pub fn expect_registration(&self, n: usize) -> Registered {
        let end = Instant::now() + super::WAIT;
        while Instant::now() < end {
            if let Some(r) = self.registrations().get(n - 1) {
                return r.clone();
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("no registration #{n} within {:?}", super::WAIT);
    }

    /// What a kubelet restart does to us: registers the plugin again (a new GetInfo and
    /// NotifyRegistrationStatus on the same socket).
    pub fn register_again(&self) -> Registered {
        let last = self.expect_registration(1);
        let r = register(&self.env, &last.socket).expect("register again");
        self.registrations.lock().unwrap().push(r.clone());
        r
    }

    /// The client of the registered endpoint: one connection, kept, as the kubelet keeps its
    /// (gRPC reconnects when the plugin restarts on the same path).
    pub fn plugin(&self) -> dra::DraPluginClient {
        let r = self.expect_registration(1);
        let mut cached = self.client.lock().unwrap();
        match &*cached {
            Some((endpoint, c)) if *endpoint == r.info.endpoint => c.clone(),
            _ => {
                let c = dra::DraPluginClient::new(channel(&self.env, Path::new(&r.info.endpoint)));
                *cached = Some((r.info.endpoint.clone(), c.clone()));
                c
            }
        }
    }

    pub fn prepare(
        &self,
        claims: &[(&str, &str, &str)],
    ) -> grpcio::Result<dra::NodePrepareResourcesResponse> {
        let mut req = dra::NodePrepareResourcesRequest::new();
        req.claims = claims.iter().map(claim).collect();
        self.plugin().node_prepare_resources_opt(
            &req,
            CallOption::default().timeout(Duration::from_secs(45)),
        )
    }

    pub fn unprepare(
        &self,
        claims: &[(&str, &str, &str)],
    ) -> grpcio::Result<dra::NodeUnprepareResourcesResponse> {
        let mut req = dra::NodeUnprepareResourcesRequest::new();
        req.claims = claims.iter().map(claim).collect();
        self.plugin().node_unprepare_resources_opt(
            &req,
            CallOption::default().timeout(Duration::from_secs(45)),
        )
    }

    /// Opens the health stream as the 1.36 kubelet does (`v1alpha1`).
    pub fn watch_health(&self) -> HealthStream {
        let r = self.expect_registration(1);
        let client = dra_health::DraResourceHealthClient::new(channel(
            &self.env,
            Path::new(&r.info.endpoint),
        ));
        let stream = client
            .node_watch_resources(&dra_health::NodeWatchResourcesRequest::new())
            .expect("open health stream");
        HealthStream {
            _client: client,
            stream,
        }
    }
}

impl Drop for DraKubelet {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

pub fn claim((namespace, name, uid): &(&str, &str, &str)) -> dra::Claim {
    let mut c = dra::Claim::new();
    c.namespace = namespace.to_string();
    c.name = name.to_string();
    c.uid = uid.to_string();
    c
}

pub struct HealthStream {
    _client: dra_health::DraResourceHealthClient,
    stream: grpcio::ClientSStreamReceiver<dra_health::NodeWatchResourcesResponse>,
}

impl HealthStream {
    /// The next whole list, within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<dra_health::NodeWatchResourcesResponse> {
        let fut = std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.stream).poll_next(cx));
        rdma_plugin::wake::block_on(fut, Some(timeout))
            .flatten()
            .and_then(Result::ok)
    }

    /// Reads lists until one satisfies `want`.
    pub fn until(
        &mut self,
        mut want: impl FnMut(&dra_health::NodeWatchResourcesResponse) -> bool,
    ) -> dra_health::NodeWatchResourcesResponse {
        let end = Instant::now() + super::WAIT;
        while Instant::now() < end {
            if let Some(list) = self.next(end.saturating_duration_since(Instant::now())) {
                if want(&list) {
                    return list;
                }
            }
        }
        panic!("no health list as wanted within {:?}", super::WAIT);
    }
}

/// The health of each device in a list: `(device, HEALTHY|UNHEALTHY|UNKNOWN)`.
pub fn healths(list: &dra_health::NodeWatchResourcesResponse) -> Vec<(String, String)> {
    list.devices
        .iter()
        .map(|d| {
            (
                d.device.device_name.clone(),
                format!("{:?}", d.health.enum_value_or_default()),
            )
        })
        .collect()
}

fn watch(
    env: &Arc<Environment>,
    dir: &Path,
    out: &Mutex<Vec<Registered>>,
    stop: &std::sync::atomic::AtomicBool,
) {
    // A socket made again at the same path may get the same inode number: its change time
    // tells it apart (the kubelet sees the create event).
    let mut seen: Vec<(PathBuf, u64, i64, i64)> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                use std::os::unix::fs::{FileTypeExt, MetadataExt};
                let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if !m.file_type().is_socket() {
                    continue;
                }
                let id = (e.path(), m.ino(), m.ctime(), m.ctime_nsec());
                if seen.contains(&id) {
                    continue;
                }
                if let Ok(r) = register(env, &e.path()) {
                    seen.push(id);
                    out.lock().unwrap().push(r);
                }
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The kubelet's handshake with one registration socket.
fn register(env: &Arc<Environment>, socket: &Path) -> Result<Registered, String> {
    let client = reg::RegistrationClient::new(channel(env, socket));
    let info = client
        .get_info_opt(
            &reg::InfoRequest::new(),
            CallOption::default().timeout(Duration::from_secs(1)),
        )
        .map_err(|e| format!("GetInfo: {e}"))?;
    let mut status = reg::RegistrationStatus::new();
    let chosen = info
        .supported_versions
        .iter()
        .find(|s| KNOWN.contains(&s.as_str()))
        .cloned();
    let ok =
        info.type_ == "DRAPlugin" && chosen.is_some() && Path::new(&info.endpoint).is_absolute();
    status.plugin_registered = ok;
    if !ok {
        status.error = format!("bad plugin info {info:?}");
    }
    client
        .notify_registration_status_opt(
            &status,
            CallOption::default().timeout(Duration::from_secs(5)),
        )
        .map_err(|e| format!("NotifyRegistrationStatus: {e}"))?;
    if !ok {
        return Err(status.error);
    }
    Ok(Registered {
        info,
        chosen: chosen.unwrap_or_default(),
        socket: socket.to_path_buf(),
    })
}
