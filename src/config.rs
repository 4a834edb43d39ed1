//! Command-line flags (getopts). Every host path is a flag so tests, k3s, microk8s and
//! containers with the host's `/` mounted elsewhere all work; values are checked here, once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use getopts::Options;

use crate::host::health::Mode;
use crate::host::nodes::Selection;
use crate::host::select::{self, LinkSelect, NamePatterns, PciId, Selector};
use crate::resource::{Devices, PerHca, Resource};

/// The kubelet hard-codes this directory, whatever its `--root-dir` (upstream
/// `pkg/apis/deviceplugin/v1beta1/constants.go`).
pub const DEFAULT_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
pub const DEFAULT_SOCKET_NAME: &str = "rdma.sock";
pub const DEFAULT_RESOURCE_NAME: &str = "jarvice.com/rdma";
pub const DEFAULT_HOST_ROOT: &str = "/";
/// A container's own (read-only) sysfs lists the host's HCAs, so no host mount is needed.
pub const DEFAULT_SYSFS: &str = "/sys";
/// One device granting every HCA: JARVICE gives jobs whole nodes.
pub const DEFAULT_SHARES: u32 = 1;
pub const MAX_SHARES: u32 = 4096;
pub const DEFAULT_POLL_SECS: u64 = 5;
pub const DEFAULT_SELF_CHECK_SECS: u64 = 60;
/// The kubelet waits up to 10 s for its dial-back before answering Register; a little more.
pub const DEFAULT_REGISTER_TIMEOUT_SECS: u64 = 12;
/// Port states are re-read this often in `ports` health mode (sysfs gives no events for them).
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 5_000;
/// A port must stay down this long before the device turns Unhealthy.
pub const DEFAULT_HOLD_DOWN_MS: u64 = 5_000;
/// Where container runtimes look for CDI specs written at run time.
pub const DEFAULT_CDI_DIR: &str = "/var/run/cdi";
/// The DRA driver name (`--driver-name`): `spec.driver` of our ResourceSlices, the name we
/// register with the kubelet, the directory of our `dra.sock`.
pub const DEFAULT_DRIVER_NAME: &str = "rdma.jarvice.com";
/// Where the kubelet looks for plugin registration sockets (`pkg/kubelet/pluginmanager`).
pub const DEFAULT_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";
/// Where kubelet plugins keep their service sockets, by convention (`<dir>/<driver>/dra.sock`).
pub const DEFAULT_PLUGINS_DIR: &str = "/var/lib/kubelet/plugins";
/// The service-account files every pod gets (in-cluster config).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Settings of the daemon and of the operator subcommands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The kubelet's device-plugin directory (`kubelet.sock` and our socket live there).
    pub plugin_dir: PathBuf,
    /// Our socket's file name in `plugin_dir`; sent as the Register endpoint.
    pub socket_name: String,
    /// The extended resource pods request, `domain/name`.
    pub resource_name: String,
    /// Where the host's `/` is seen (`/` normally; e.g. `/host` in a pod that mounts it there).
    pub host_root: PathBuf,
    /// Where sysfs is seen, for the HCAs: ports, PCI, NUMA nodes, which nodes are whose.
    pub sysfs: PathBuf,
    /// How many devices to advertise; each grants all device nodes.
    pub shares: u32,
    /// Also pass `umad*` and `issm*`.
    pub mad_devices: bool,
    /// Rescan interval when a directory cannot be watched with inotify.
    pub poll_interval: Duration,
    /// Interval of the self-check (socket present, registration current); zero disables it.
    pub self_check: Duration,
    /// How long one Register call may take (the kubelet's dial-back alone may take 10 s).
    pub register_timeout: Duration,
    /// Poll instead of using inotify (`--poll`), for filesystems without inotify events.
    pub poll_only: bool,
    /// Which HCAs are granted (`--hcas`, `--link-layer`, `--pci-ids`, `--pci-addrs`).
    pub selector: Selector,
    /// Which rule decides health (`--health`).
    pub health: Mode,
    /// How often port states are re-read in `ports` mode.
    pub health_interval: Duration,
    /// How long a port must stay down before it counts as down.
    pub hold_down: Duration,
    /// One device per HCA instead of `shares` devices granting every HCA.
    pub per_hca: bool,
    /// Per-HCA grants also set `NCCL_IB_HCA` and `UCX_NET_DEVICES` (`--hca-envs`).
    pub hca_envs: bool,
    /// The `--resource` specs; empty: the one resource of the flags above (the drop-in).
    pub resources: Vec<ResourceSpec>,
    /// HCAs that per-HCA resources declared before this one select: never granted here too.
    pub taken: Vec<(String, Selector)>,
    /// Write CDI specs and answer Allocate with CDI names (`--cdi`).
    pub cdi: bool,
    /// Where CDI specs go (`--cdi-dir`).
    pub cdi_dir: PathBuf,
    /// With `--cdi`, answer with CDI names alone, no DeviceSpecs (`--cdi-only`; off: runtimes
    /// without CDI still get the devices).
    pub cdi_only: bool,
    /// Shared device IDs are this and an index: `rdma-` for the drop-in's (whatever its
    /// resource name), `<name>-` for a `--resource` spec's, so IDs are unique in the process.
    pub id_prefix: String,
    /// Which kubelet API serves the resources (`--frontend`).
    pub frontend: Frontend,
    /// The DRA front-end's settings (used with `--frontend dra` and by `list`/`diagnose`).
    pub dra: DraConfig,
    /// `--metrics-address`: where Prometheus scrapes `/metrics` (off when `None`).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// `--events`: post Kubernetes Events on this node's Node object.
    pub events: bool,
}

/// The kubelet API the resources are served through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Frontend {
    /// The device-plugin API v1beta1 (the drop-in).
    #[default]
    DevicePlugin,
    /// Dynamic Resource Allocation (`resource.k8s.io/v1`, kubelet DRA plugin API v1).
    Dra,
}

/// Where the DRA front-end finds the kubelet and the API server. `None`: in-cluster (the
/// service env, `NODE_NAME`), resolved when the front-end starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DraConfig {
    pub driver: String,
    pub node_name: Option<String>,
    pub kube_api: Option<String>,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub registry_dir: PathBuf,
    pub plugins_dir: PathBuf,
}

impl Default for DraConfig {
    fn default() -> DraConfig {
        DraConfig {
            driver: DEFAULT_DRIVER_NAME.to_string(),
            node_name: None,
            kube_api: None,
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            ca_file: PathBuf::from(DEFAULT_CA_FILE),
            registry_dir: PathBuf::from(DEFAULT_REGISTRY_DIR),
            plugins_dir: PathBuf::from(DEFAULT_PLUGINS_DIR),
        }
    }
}

impl DraConfig {
    /// `<registry-dir>/<driver>-reg.sock`: where the kubelet finds us.
    pub fn registration_socket(&self) -> PathBuf {
        self.registry_dir.join(format!("{}-reg.sock", self.driver))
    }

    /// `<plugins-dir>/<driver>/dra.sock`: where the kubelet calls us (the path we register,
    /// the same inside our pod and on the host).
    pub fn service_socket(&self) -> PathBuf {
        self.plugins_dir.join(&self.driver).join("dra.sock")
    }
}

/// One `--resource NAME[,key=value...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceSpec {
    pub name: String,
    pub socket_name: String,
    pub per_hca: bool,
    pub shares: u32,
    pub selector: Selector,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            plugin_dir: PathBuf::from(DEFAULT_PLUGIN_DIR),
            socket_name: DEFAULT_SOCKET_NAME.to_string(),
            resource_name: DEFAULT_RESOURCE_NAME.to_string(),
            host_root: PathBuf::from(DEFAULT_HOST_ROOT),
            sysfs: PathBuf::from(DEFAULT_SYSFS),
            shares: DEFAULT_SHARES,
            mad_devices: false,
            poll_interval: Duration::from_secs(DEFAULT_POLL_SECS),
            self_check: Duration::from_secs(DEFAULT_SELF_CHECK_SECS),
            register_timeout: Duration::from_secs(DEFAULT_REGISTER_TIMEOUT_SECS),
            poll_only: false,
            selector: Selector::default(),
            health: Mode::Auto,
            health_interval: Duration::from_millis(DEFAULT_HEALTH_INTERVAL_MS),
            hold_down: Duration::from_millis(DEFAULT_HOLD_DOWN_MS),
            per_hca: false,
            hca_envs: false,
            resources: Vec::new(),
            taken: Vec::new(),
            id_prefix: crate::resource::ID_PREFIX.to_string(),
            cdi: false,
            cdi_dir: PathBuf::from(DEFAULT_CDI_DIR),
            cdi_only: false,
            frontend: Frontend::DevicePlugin,
            dra: DraConfig::default(),
            metrics_address: None,
            events: false,
        }
    }
}

impl Config {
    /// `<plugin-dir>/<socket-name>`: where we serve.
    pub fn socket_path(&self) -> PathBuf {
        self.plugin_dir.join(&self.socket_name)
    }

    /// `<plugin-dir>/kubelet.sock`: where the kubelet takes registrations.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.plugin_dir
            .join(crate::kubelet::registration::KUBELET_SOCKET)
    }

    /// Which optional node families discovery passes.
    pub fn selection(&self) -> Selection {
        Selection {
            mad: self.mad_devices,
        }
    }

    /// The advertised devices: `--shares` of them granting every selected HCA, or one per HCA.
    /// The drop-in's IDs are `rdma-N`; another shared resource's are `<name>-N`.
    pub fn resource(&self) -> Devices {
        if self.per_hca {
            return Devices::PerHca(PerHca {
                hca_envs: self.hca_envs,
            });
        }
        Devices::Shared(Resource::with_prefix(&self.id_prefix, self.shares))
    }

    /// One configuration per resource served: the flags' own (drop-in), or one per `--resource`
    /// spec, each carrying its name, socket, mode and selection, and the per-HCA selections
    /// declared before it.
    pub fn units(&self) -> Vec<Config> {
        if self.resources.is_empty() {
            return vec![self.clone()];
        }
        let mut taken: Vec<(String, Selector)> = Vec::new();
        let mut out = Vec::new();
        for spec in &self.resources {
            let mut c = self.clone();
            c.resources = Vec::new();
            c.resource_name = spec.name.clone();
            c.socket_name = spec.socket_name.clone();
            c.per_hca = spec.per_hca;
            c.shares = spec.shares;
            c.selector = spec.selector.clone();
            let short = spec
                .name
                .split_once('/')
                .map_or(spec.name.as_str(), |(_, n)| n);
            c.id_prefix = format!("{short}-");
            c.taken = if spec.per_hca {
                taken.clone()
            } else {
                Vec::new()
            };
            if spec.per_hca {
                taken.push((spec.name.clone(), spec.selector.clone()));
            }
            out.push(c);
        }
        out
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the device plugin.
    Serve(Config),
    /// Print what would be advertised and allocated on this host (`list [--json]`).
    List {
        config: Config,
        json: bool,
    },
    /// Check a running plugin the way the kubelet does (`probe`).
    Probe(Config),
    /// Check what RDMA pods need on this node, one line per check (`diagnose [--json]`).
    Diagnose {
        config: Config,
        json: bool,
    },
    Help(String),
    Version,
}

/// A bad command line; printed with a hint and exit code 2.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (see --help)", self.0)
    }
}

impl std::error::Error for UsageError {}

fn options() -> Options {
    let mut o = Options::new();
    o.optopt(
        "",
        "plugin-dir",
        &format!("kubelet device-plugin directory [default: {DEFAULT_PLUGIN_DIR}]"),
        "DIR",
    );
    o.optopt(
        "",
        "socket-name",
        &format!("socket file name inside --plugin-dir [default: {DEFAULT_SOCKET_NAME}]"),
        "NAME",
    );
    o.optopt(
        "",
        "resource-name",
        &format!("extended resource to advertise, domain/name [default: {DEFAULT_RESOURCE_NAME}]"),
        "NAME",
    );
    o.optopt(
        "",
        "host-root",
        &format!(
            "where the host's / is mounted; devices are looked for under ROOT/dev [default: {DEFAULT_HOST_ROOT}]"
        ),
        "ROOT",
    );
    o.optopt(
        "",
        "sysfs",
        &format!("where sysfs is mounted, for the HCAs, their ports and NUMA nodes [default: {DEFAULT_SYSFS}]"),
        "DIR",
    );
    o.optopt(
        "",
        "shares",
        &format!(
            "devices to advertise, each granting all RDMA nodes, 1..{MAX_SHARES} [default: {DEFAULT_SHARES}]"
        ),
        "N",
    );
    o.optflag(
        "",
        "mad-devices",
        "also pass /dev/infiniband/umad* and issm* (ibstat, perfquery, subnet managers) [default: off]",
    );
    o.optopt(
        "",
        "poll-interval",
        &format!(
            "seconds between rescans where inotify is unavailable [default: {DEFAULT_POLL_SECS}]"
        ),
        "SECS",
    );
    o.optopt(
        "",
        "self-check",
        &format!(
            "seconds between checks that our socket and registration are current, 0 = off [default: {DEFAULT_SELF_CHECK_SECS}]"
        ),
        "SECS",
    );
    o.optopt(
        "",
        "register-timeout",
        &format!("seconds one Register call may take [default: {DEFAULT_REGISTER_TIMEOUT_SECS}]"),
        "SECS",
    );
    o.optflag(
        "",
        "poll",
        "poll every --poll-interval instead of using inotify (filesystems without inotify) [default: off]",
    );
    o.optopt(
        "",
        "hcas",
        "grant only these HCAs: names or patterns, comma-separated, '!' excludes (mlx5_*,!mlx5_2) [default: every HCA]",
        "PATTERNS",
    );
    o.optopt(
        "",
        "link-layer",
        "grant only HCAs with a port of this link layer: infiniband, ethernet (RoCE) or any [default: any]",
        "LAYER",
    );
    o.optopt(
        "",
        "pci-ids",
        "grant only HCAs with these PCI IDs, VENDOR:DEVICE in hex, comma-separated (15b3:101b,15b3:*) [default: any]",
        "IDS",
    );
    o.optopt(
        "",
        "pci-addrs",
        "grant only HCAs at these PCI addresses or patterns, comma-separated (0000:3b:00.0,0000:86:*) [default: any]",
        "ADDRS",
    );
    o.optopt(
        "",
        "health",
        "health rule: ports (an ACTIVE/LinkUp port and its uverbs node), nodes (a uverbs node), auto (ports when sysfs describes the HCAs, else nodes) [default: auto]",
        "RULE",
    );
    o.optopt(
        "",
        "health-interval",
        &format!(
            "seconds between port-state readings in ports mode, decimals allowed [default: {}]",
            DEFAULT_HEALTH_INTERVAL_MS / 1000
        ),
        "SECS",
    );
    o.optopt(
        "",
        "hold-down",
        &format!(
            "seconds a port must stay down before the device turns Unhealthy; coming up counts at once [default: {}]",
            DEFAULT_HOLD_DOWN_MS / 1000
        ),
        "SECS",
    );
    o.optmulti(
        "",
        "resource",
        "serve a resource (repeatable): NAME[,mode=shared|per-hca][,shares=N][,link=LAYER][,hcas=P;P][,pci-ids=ID;ID][,pci-addrs=A;A][,socket=FILE]; lists inside a value use ';' [default: the one resource of --resource-name]",
        "SPEC",
    );
    o.optflag(
        "",
        "hca-envs",
        "per-HCA grants also set NCCL_IB_HCA and UCX_NET_DEVICES (JARVICE_RDMA_HCAS is always set) [default: off]",
    );
    o.optflag(
        "",
        "cdi",
        "keep a CDI spec per resource in --cdi-dir and answer Allocate with CDI device names and device specs (containerd 2.0+, CRI-O; Kubernetes 1.31+) [default: off]",
    );
    o.optopt(
        "",
        "cdi-dir",
        &format!("where CDI specs are written, with --cdi [default: {DEFAULT_CDI_DIR}]"),
        "DIR",
    );
    o.optflag(
        "",
        "cdi-only",
        "with --cdi, answer Allocate with CDI names alone: pods on a runtime without CDI (containerd 1.6, 1.7 without enable_cdi) then start without the devices [default: off: CDI names and device specs]",
    );
    o.optflag(
        "",
        "cdi-device-specs",
        "accepted for compatibility: device specs come with --cdi unless --cdi-only [default: on]",
    );
    o.optopt(
        "",
        "frontend",
        "the kubelet API to serve through: device-plugin (v1beta1, the drop-in) or dra (resource.k8s.io/v1 ResourceSlices and claims) [default: device-plugin]",
        "API",
    );
    o.optopt(
        "",
        "driver-name",
        &format!("with --frontend dra: the DRA driver name (slices, registration, socket dir) [default: {DEFAULT_DRIVER_NAME}]"),
        "NAME",
    );
    o.optopt(
        "",
        "node-name",
        "with --frontend dra or --events: this node's name (the slice's pool and nodeName) [default: $NODE_NAME]",
        "NAME",
    );
    o.optopt(
        "",
        "kube-api",
        "with --frontend dra or --events: the API server's URL [default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT]",
        "URL",
    );
    o.optopt(
        "",
        "kube-token-file",
        &format!("with --frontend dra or --events: bearer token, re-read every minute and on a 401 [default: {DEFAULT_TOKEN_FILE}]"),
        "FILE",
    );
    o.optopt(
        "",
        "kube-ca-file",
        &format!("with --frontend dra or --events: the only CA trusted for the API server [default: {DEFAULT_CA_FILE}]"),
        "FILE",
    );
    o.optopt(
        "",
        "kubelet-registry-dir",
        &format!("with --frontend dra: the kubelet's plugin registration directory [default: {DEFAULT_REGISTRY_DIR}]"),
        "DIR",
    );
    o.optopt(
        "",
        "kubelet-plugins-dir",
        &format!("with --frontend dra: where dra.sock goes, in DIR/<driver>/ [default: {DEFAULT_PLUGINS_DIR}]"),
        "DIR",
    );
    o.optopt(
        "",
        "metrics-address",
        "serve Prometheus metrics at http://HOST:PORT/metrics (an IP address, e.g. $(POD_IP):9465 or [::]:9465) [default: off]",
        "HOST:PORT",
    );
    o.optflag(
        "",
        "events",
        "post Kubernetes Events on this node's Node (health changes, refused device nodes, registration failing, front-ends colliding); needs --node-name or $NODE_NAME and the API server (--kube-* flags) [default: off]",
    );
    o.optflag(
        "",
        "json",
        "with `list` or `diagnose`: print JSON instead of text",
    );
    o.optflag("h", "help", "print this help and exit");
    o.optflag("V", "version", "print the version and exit");
    o
}

/// The full `--help` text.
pub fn usage() -> String {
    let brief = format!(
        "jarvice-rdma-plugin {}: Kubernetes device plugin for InfiniBand/RDMA device nodes\n\n\
         Usage: jarvice-rdma-plugin [serve] [FLAGS]       run the device plugin (default; --frontend dra: the DRA driver)\n       \
         jarvice-rdma-plugin list [--json] [FLAGS]   print what would be advertised and allocated here\n       \
         jarvice-rdma-plugin probe [FLAGS]           check the running plugin like the kubelet does (exit 0 = ok)\n       \
         jarvice-rdma-plugin diagnose [--json] [FLAGS]  check what RDMA pods need on this node (exit 0 = no failure)\n\n\
         Logging: RUST_LOG=debug|info|warn (default info).",
        env!("CARGO_PKG_VERSION")
    );
    options().usage(&brief)
}

/// A socket path that fits `sun_path`, and so does the private name gRPC binds next to it
/// ([`crate::kubelet::server`]).
fn check_socket_path(path: &Path) -> Result<(), UsageError> {
    let len = path.as_os_str().len();
    let dir = path.parent().map_or(0, |d| d.as_os_str().len());
    let private = dir + 1 + crate::kubelet::server::PRIVATE_NAME_MAX;
    if len.max(private) > MAX_SOCKET_PATH {
        return Err(UsageError(format!(
            "socket path {} is {len} bytes; a unix socket path can hold at most {MAX_SOCKET_PATH}, and the plugin dir at most {}",
            path.display(),
            MAX_SOCKET_PATH - 1 - crate::kubelet::server::PRIVATE_NAME_MAX
        )));
    }
    Ok(())
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, UsageError> {
    let m = options()
        .parse(args)
        .map_err(|e| UsageError(e.to_string()))?;
    if m.opt_present("help") {
        return Ok(Command::Help(usage()));
    }
    if m.opt_present("version") {
        return Ok(Command::Version);
    }
    let verb = match m.free.as_slice() {
        [] => "serve",
        [one] => one.as_str(),
        [_, extra, ..] => return Err(UsageError(format!("unexpected argument {extra:?}"))),
    };
    let config = config_from(&m)?;
    let json = m.opt_present("json");
    if json && verb != "list" && verb != "diagnose" {
        return Err(UsageError(
            "--json goes with `list` or `diagnose` only".into(),
        ));
    }
    match verb {
        "serve" => Ok(Command::Serve(config)),
        "list" => Ok(Command::List { config, json }),
        "probe" => Ok(Command::Probe(config)),
        "diagnose" => Ok(Command::Diagnose { config, json }),
        other => Err(UsageError(format!(
            "unknown command {other:?}: expected serve, list, probe or diagnose"
        ))),
    }
}

fn config_from(m: &getopts::Matches) -> Result<Config, UsageError> {
    let mut c = Config::default();
    if let Some(dir) = m.opt_str("plugin-dir") {
        c.plugin_dir = absolute_dir("--plugin-dir", &dir)?;
    }
    if let Some(name) = m.opt_str("socket-name") {
        c.socket_name = name;
    }
    check_socket_name(&c.socket_name)?;
    if let Some(name) = m.opt_str("resource-name") {
        check_resource_name(&name)?;
        c.resource_name = name;
    }
    if let Some(root) = m.opt_str("host-root") {
        c.host_root = absolute_dir("--host-root", &root)?;
    }
    if let Some(dir) = m.opt_str("sysfs") {
        c.sysfs = absolute_dir("--sysfs", &dir)?;
    }
    if let Some(n) = m.opt_str("shares") {
        c.shares = match n.parse::<u32>() {
            Ok(n) if (1..=MAX_SHARES).contains(&n) => n,
            _ => {
                return Err(UsageError(format!(
                    "--shares must be a whole number from 1 to {MAX_SHARES}, not {n:?}"
                )))
            }
        };
    }
    c.mad_devices = m.opt_present("mad-devices");
    if let Some(s) = m.opt_str("poll-interval") {
        c.poll_interval = seconds("--poll-interval", &s, 1)?;
    }
    if let Some(s) = m.opt_str("self-check") {
        c.self_check = seconds("--self-check", &s, 0)?;
    }
    if let Some(s) = m.opt_str("register-timeout") {
        c.register_timeout = seconds("--register-timeout", &s, 1)?;
    }
    c.poll_only = m.opt_present("poll");
    fn flag_err(flag: &'static str) -> impl Fn(select::ParseError) -> UsageError {
        move |e| UsageError(format!("{flag}: {e}"))
    }
    if let Some(v) = m.opt_str("hcas") {
        c.selector.names = Some(NamePatterns::parse(&v).map_err(flag_err("--hcas"))?);
    }
    if let Some(v) = m.opt_str("link-layer") {
        c.selector.link = LinkSelect::parse(&v).map_err(flag_err("--link-layer"))?;
    }
    if let Some(v) = m.opt_str("pci-ids") {
        c.selector.pci_ids = PciId::parse_list(&v).map_err(flag_err("--pci-ids"))?;
    }
    if let Some(v) = m.opt_str("pci-addrs") {
        c.selector.pci_addrs = select::parse_pci_addrs(&v).map_err(flag_err("--pci-addrs"))?;
    }
    if let Some(v) = m.opt_str("health") {
        c.health = Mode::parse(&v).ok_or_else(|| {
            UsageError(format!("--health must be ports, nodes or auto, not {v:?}"))
        })?;
    }
    if let Some(s) = m.opt_str("health-interval") {
        c.health_interval = decimal_seconds("--health-interval", &s, 0.05)?;
    }
    if let Some(s) = m.opt_str("hold-down") {
        c.hold_down = decimal_seconds("--hold-down", &s, 0.0)?;
    }
    c.hca_envs = m.opt_present("hca-envs");
    c.cdi = m.opt_present("cdi");
    if let Some(dir) = m.opt_str("cdi-dir") {
        c.cdi_dir = absolute_dir("--cdi-dir", &dir)?;
    }
    c.cdi_only = m.opt_present("cdi-only");
    dra_from(m, &mut c)?;
    if c.frontend == Frontend::Dra && c.cdi {
        return Err(UsageError(
            "--cdi is the device plugin's: with --frontend dra every prepared claim gets a CDI spec in --cdi-dir".into(),
        ));
    }
    // DRA writes a CDI spec per claim into --cdi-dir whatever --cdi says.
    let cdi_flags: &[&str] = if c.frontend == Frontend::Dra {
        &["cdi-only", "cdi-device-specs"]
    } else {
        &["cdi-dir", "cdi-only", "cdi-device-specs"]
    };
    if let Some(flag) = cdi_flags.iter().find(|f| !c.cdi && m.opt_present(f)) {
        return Err(UsageError(format!("--{flag} goes with --cdi")));
    }
    if c.cdi_only && m.opt_present("cdi-device-specs") {
        return Err(UsageError(
            "--cdi-only and --cdi-device-specs contradict each other".into(),
        ));
    }
    let specs = m.opt_strs("resource");
    if !specs.is_empty() {
        for flag in [
            "resource-name",
            "socket-name",
            "shares",
            "hcas",
            "link-layer",
            "pci-ids",
            "pci-addrs",
        ] {
            if m.opt_present(flag) {
                return Err(UsageError(format!(
                    "--{flag} goes with the single resource of the flags; with --resource, use the spec's keys"
                )));
            }
        }
        c.resources = parse_specs(&specs)?;
        let first = &c.resources[0];
        c.resource_name = first.name.clone();
        c.socket_name = first.socket_name.clone();
    }
    for unit in c.units() {
        if c.cdi && !crate::resource::cdi::valid_kind(&unit.resource_name) {
            return Err(UsageError(format!(
                "--cdi: {} is not a CDI kind (vendor/class: each starting with a letter, the class of letters, digits, '_' and '-')",
                unit.resource_name
            )));
        }
        check_socket_path(&unit.socket_path())?;
    }
    check_socket_path(&c.socket_path())?;
    if c.frontend == Frontend::Dra {
        check_socket_path(&c.dra.registration_socket())?;
        check_socket_path(&c.dra.service_socket())?;
    }
    Ok(c)
}

/// The DRA flags; each but `--frontend` needs `--frontend dra` (`list` and `diagnose` take them
/// with it too).
fn dra_from(m: &getopts::Matches, c: &mut Config) -> Result<(), UsageError> {
    if let Some(v) = m.opt_str("frontend") {
        c.frontend = match v.as_str() {
            "device-plugin" => Frontend::DevicePlugin,
            "dra" if cfg!(feature = "dra") => Frontend::Dra,
            "dra" => {
                return Err(UsageError(
                    "--frontend dra: this binary was built without the `dra` feature".into(),
                ))
            }
            _ => {
                return Err(UsageError(format!(
                    "--frontend must be device-plugin or dra, not {v:?}"
                )))
            }
        };
    }
    if let Some(v) = m.opt_str("metrics-address") {
        if !cfg!(feature = "metrics") {
            return Err(UsageError(
                "--metrics-address: this binary was built without the `metrics` feature".into(),
            ));
        }
        c.metrics_address = Some(v.parse().map_err(|_| {
            UsageError(format!(
                "--metrics-address must be IP:PORT (10.0.0.5:9465, [::]:9465), not {v:?}"
            ))
        })?);
    }
    c.events = m.opt_present("events");
    if c.events && !cfg!(feature = "dra") {
        return Err(UsageError(
            "--events: this binary was built without the API client (the `dra` feature)".into(),
        ));
    }
    let flags = ["driver-name", "kubelet-registry-dir", "kubelet-plugins-dir"];
    if let Some(flag) = flags
        .iter()
        .find(|f| c.frontend != Frontend::Dra && m.opt_present(f))
    {
        return Err(UsageError(format!("--{flag} goes with --frontend dra")));
    }
    // The API server's flags serve the DRA front-end and the Events.
    let api_flags = ["node-name", "kube-api", "kube-token-file", "kube-ca-file"];
    if let Some(flag) = api_flags
        .iter()
        .find(|f| c.frontend != Frontend::Dra && !c.events && m.opt_present(f))
    {
        return Err(UsageError(format!(
            "--{flag} goes with --frontend dra or --events"
        )));
    }
    let d = &mut c.dra;
    if let Some(v) = m.opt_str("driver-name") {
        if !is_dns_subdomain(&v, 63) {
            return Err(UsageError(format!(
                "--driver-name must be a DNS subdomain of at most 63 characters (rdma.example.com), not {v:?}"
            )));
        }
        d.driver = v;
    }
    if let Some(v) = m.opt_str("node-name") {
        if !is_dns_subdomain(&v, 253) {
            return Err(UsageError(format!(
                "--node-name must be a Kubernetes node name (a DNS subdomain), not {v:?}"
            )));
        }
        d.node_name = Some(v);
    }
    if let Some(v) = m.opt_str("kube-api") {
        if !(v.starts_with("https://") || v.starts_with("http://")) || v.len() > 2048 {
            return Err(UsageError(format!(
                "--kube-api must be an http:// or https:// URL, not {v:?}"
            )));
        }
        d.kube_api = Some(v.trim_end_matches('/').to_string());
    }
    if let Some(v) = m.opt_str("kube-token-file") {
        d.token_file = absolute_dir("--kube-token-file", &v)?;
    }
    if let Some(v) = m.opt_str("kube-ca-file") {
        d.ca_file = absolute_dir("--kube-ca-file", &v)?;
    }
    if let Some(v) = m.opt_str("kubelet-registry-dir") {
        d.registry_dir = absolute_dir("--kubelet-registry-dir", &v)?;
    }
    if let Some(v) = m.opt_str("kubelet-plugins-dir") {
        d.plugins_dir = absolute_dir("--kubelet-plugins-dir", &v)?;
    }
    Ok(())
}

/// A DNS subdomain (RFC 1123) of at most `max` characters: dot-separated labels of lowercase
/// letters, digits and `-`, each starting and ending with a letter or digit.
pub fn is_dns_subdomain(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.split('.').all(|l| is_dns_label(l, 63))
}

/// A DNS label (RFC 1123) of at most `max` characters.
pub fn is_dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn absolute_dir(flag: &str, value: &str) -> Result<PathBuf, UsageError> {
    let p = Path::new(value);
    if value.is_empty() || !p.is_absolute() {
        return Err(UsageError(format!(
            "{flag} must be an absolute path, not {value:?}"
        )));
    }
    Ok(p.to_path_buf())
}

fn seconds(flag: &str, value: &str, min: u64) -> Result<Duration, UsageError> {
    match value.parse::<u64>() {
        Ok(n) if n >= min && n <= 86_400 => Ok(Duration::from_secs(n)),
        _ => Err(UsageError(format!(
            "{flag} must be whole seconds from {min} to 86400, not {value:?}"
        ))),
    }
}

/// Parses every `--resource` spec and checks them against each other.
fn parse_specs(specs: &[String]) -> Result<Vec<ResourceSpec>, UsageError> {
    let mut out: Vec<ResourceSpec> = Vec::new();
    for raw in specs {
        let spec = parse_spec(raw)?;
        if let Some(other) = out.iter().find(|o| o.name == spec.name) {
            return Err(UsageError(format!(
                "--resource {raw:?}: resource {} is declared twice",
                other.name
            )));
        }
        let short = |n: &str| n.split_once('/').map_or(n, |(_, s)| s).to_string();
        if let Some(other) = out.iter().find(|o| short(&o.name) == short(&spec.name)) {
            return Err(UsageError(format!(
                "--resource {raw:?}: {} and {} end in the same name: their device IDs ({}-0, ...) would collide",
                other.name,
                spec.name,
                short(&spec.name)
            )));
        }
        if let Some(other) = out.iter().find(|o| o.socket_name == spec.socket_name) {
            return Err(UsageError(format!(
                "--resource {raw:?}: socket {} is {}'s already; give one with socket=NAME",
                spec.socket_name, other.name
            )));
        }
        out.push(spec);
    }
    Ok(out)
}

/// `jarvice.com/ib,mode=per-hca,link=infiniband,hcas=mlx5_*;!mlx5_4`.
fn parse_spec(raw: &str) -> Result<ResourceSpec, UsageError> {
    let bad = |why: String| UsageError(format!("--resource {raw:?}: {why}"));
    let mut parts = raw.split(',');
    let name = parts.next().unwrap_or("").trim().to_string();
    check_resource_name(&name).map_err(|e| bad(e.0))?;
    let short = name.split_once('/').map_or(name.as_str(), |(_, n)| n);
    let mut spec = ResourceSpec {
        socket_name: format!("{short}.sock"),
        name: name.clone(),
        per_hca: false,
        shares: DEFAULT_SHARES,
        selector: Selector::default(),
    };
    let mut shares_set = false;
    let list = |v: &str| v.replace(';', ",");
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
        let value = value.trim();
        match key.trim() {
            "mode" => {
                spec.per_hca = match value {
                    "shared" => false,
                    "per-hca" => true,
                    _ => return Err(bad(format!("mode {value:?}: expected shared or per-hca"))),
                }
            }
            "shares" => {
                spec.shares = match value.parse::<u32>() {
                    Ok(n) if (1..=MAX_SHARES).contains(&n) => n,
                    _ => {
                        return Err(bad(format!(
                            "shares {value:?}: expected a whole number from 1 to {MAX_SHARES}"
                        )))
                    }
                };
                shares_set = true;
            }
            "link" => spec.selector.link = LinkSelect::parse(value).map_err(|e| bad(e.0))?,
            "hcas" => {
                spec.selector.names = Some(NamePatterns::parse(&list(value)).map_err(|e| bad(e.0))?)
            }
            "pci-ids" => {
                spec.selector.pci_ids = PciId::parse_list(&list(value)).map_err(|e| bad(e.0))?
            }
            "pci-addrs" => {
                spec.selector.pci_addrs =
                    select::parse_pci_addrs(&list(value)).map_err(|e| bad(e.0))?
            }
            "socket" => {
                check_socket_name(value).map_err(|e| bad(e.0))?;
                spec.socket_name = value.to_string();
            }
            other => {
                return Err(bad(format!(
                    "unknown key {other:?} (mode, shares, link, hcas, pci-ids, pci-addrs, socket)"
                )))
            }
        }
    }
    if spec.per_hca && shares_set {
        return Err(bad(
            "shares= goes with mode=shared (per-hca has one device per HCA)".into(),
        ));
    }
    check_socket_name(&spec.socket_name).map_err(|e| bad(e.0))?;
    Ok(spec)
}

/// Seconds with an optional fraction (`0.5`), from `min` to a day.
fn decimal_seconds(flag: &str, value: &str, min: f64) -> Result<Duration, UsageError> {
    match value.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= min && n <= 86_400.0 => Ok(Duration::from_secs_f64(n)),
        _ => Err(UsageError(format!(
            "{flag} must be seconds from {min} to 86400 (decimals allowed), not {value:?}"
        ))),
    }
}

fn check_socket_name(name: &str) -> Result<(), UsageError> {
    if name.is_empty()
        || name.contains('/')
        || name.contains('\0')
        || name == "."
        || name == ".."
        || name == crate::kubelet::registration::KUBELET_SOCKET
        || name == "kubelet_internal_checkpoint"
    {
        return Err(UsageError(format!(
            "--socket-name must be a plain file name other than the kubelet's own files, not {name:?}"
        )));
    }
    Ok(())
}

/// The kubelet accepts only extended resource names: `domain/name` with a DNS-subdomain domain
/// outside `kubernetes.io` and a qualified name (`IsExtendedResourceName`, validation.go).
pub fn check_resource_name(name: &str) -> Result<(), UsageError> {
    let bad = |why: &str| {
        Err(UsageError(format!(
            "--resource-name {name:?} is not an extended resource name (domain/name): {why}"
        )))
    };
    let Some((domain, short)) = name.split_once('/') else {
        return bad("no '/'");
    };
    if short.contains('/') {
        return bad("more than one '/'");
    }
    let dns_ok = !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !dns_ok {
        return bad("the domain must be a lower-case DNS subdomain");
    }
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        return bad("kubernetes.io names are reserved for native resources");
    }
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let name_ok = !short.is_empty()
        && short.len() <= 63
        && short
            .bytes()
            .all(|b| alnum(b) || b == b'-' || b == b'_' || b == b'.')
        && short.bytes().next().is_some_and(alnum)
        && short.bytes().last().is_some_and(alnum);
    if !name_ok {
        return bad("the name must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn defaults() {
        let Command::Serve(c) = parse(&[]).unwrap() else {
            panic!("not serve")
        };
        assert_eq!(c, Config::default());
        assert_eq!(
            c.socket_path(),
            Path::new("/var/lib/kubelet/device-plugins/rdma.sock")
        );
        assert_eq!(c.resource_name, "jarvice.com/rdma");
    }

    #[test]
    fn every_flag() {
        let cmd = parse(&args(&[
            "--plugin-dir=/var/lib/rancher/k3s/agent/kubelet/device-plugins",
            "--socket-name",
            "ib.sock",
            "--resource-name",
            "example.org/ib",
            "--host-root",
            "/host",
            "--sysfs",
            "/host/sys",
            "--shares",
            "8",
            "--mad-devices",
            "--poll-interval",
            "2",
            "--self-check",
            "0",
            "--register-timeout",
            "3",
            "--poll",
        ]))
        .unwrap();
        let Command::Serve(c) = cmd else { panic!() };
        assert_eq!(
            c.kubelet_socket(),
            Path::new("/var/lib/rancher/k3s/agent/kubelet/device-plugins/kubelet.sock")
        );
        assert_eq!(c.socket_name, "ib.sock");
        assert_eq!(c.resource_name, "example.org/ib");
        assert_eq!(c.host_root, Path::new("/host"));
        assert_eq!(c.sysfs, Path::new("/host/sys"));
        assert_eq!(c.shares, 8);
        assert!(c.mad_devices);
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.self_check, Duration::ZERO);
        assert_eq!(c.register_timeout, Duration::from_secs(3));
        assert!(c.poll_only);
        assert_eq!(c.health, Mode::Auto);
        assert_eq!(c.hold_down, Duration::from_secs(5));
    }

    #[test]
    fn hca_selection_and_health_flags() {
        let cmd = parse(&args(&[
            "--hcas",
            "mlx5_*,!mlx5_3",
            "--link-layer=infiniband",
            "--pci-ids",
            "15b3:101b,15b3:*",
            "--pci-addrs",
            "0000:3B:00.0",
            "--health",
            "ports",
            "--health-interval",
            "0.25",
            "--hold-down",
            "0",
        ]))
        .unwrap();
        let Command::Serve(c) = cmd else { panic!() };
        assert_eq!(
            c.selector.describe(),
            "--hcas mlx5_*,!mlx5_3 --link-layer infiniband --pci-ids 15b3:101b,15b3:* --pci-addrs 0000:3b:00.0"
        );
        assert_eq!(c.health, Mode::Ports);
        assert_eq!(c.health_interval, Duration::from_millis(250));
        assert_eq!(c.hold_down, Duration::ZERO);
        for bad in [
            &["--hcas", ""][..],
            &["--hcas", "!"],
            &["--link-layer", "fddi"],
            &["--pci-ids", "15b3"],
            &["--pci-addrs", "mlx5_0"],
            &["--health", "maybe"],
            &["--health-interval", "0"],
            &["--health-interval", "NaN"],
            &["--hold-down", "-1"],
            &["--hold-down", "1e9"],
        ] {
            let err = parse(&args(bad)).unwrap_err();
            assert!(err.to_string().contains(bad[0]), "{bad:?}: {err}");
        }
        assert!(matches!(
            parse(&args(&["diagnose", "--json"])).unwrap(),
            Command::Diagnose { json: true, .. }
        ));
    }

    #[test]
    fn subcommands() {
        assert!(matches!(
            parse(&args(&["list", "--json"])),
            Ok(Command::List { json: true, .. })
        ));
        assert!(matches!(parse(&args(&["probe"])), Ok(Command::Probe(_))));
        assert!(matches!(parse(&args(&["-V"])), Ok(Command::Version)));
        assert!(matches!(parse(&args(&["--help"])), Ok(Command::Help(_))));
    }

    #[cfg(feature = "dra")]
    #[test]
    fn dra_flags() {
        let Command::Serve(c) = parse(&args(&[])).unwrap() else {
            panic!("serve")
        };
        assert_eq!(c.frontend, Frontend::DevicePlugin);
        assert_eq!(
            c.dra.registration_socket(),
            Path::new("/var/lib/kubelet/plugins_registry/rdma.jarvice.com-reg.sock")
        );
        assert_eq!(
            c.dra.service_socket(),
            Path::new("/var/lib/kubelet/plugins/rdma.jarvice.com/dra.sock")
        );
        let Command::Serve(c) = parse(&args(&[
            "--frontend",
            "dra",
            "--driver-name",
            "rdma.example.com",
            "--node-name",
            "n-1.example",
            "--kube-api",
            "https://10.0.0.1:6443/",
            "--kube-token-file",
            "/t",
            "--kube-ca-file",
            "/c",
            "--kubelet-registry-dir",
            "/r",
            "--kubelet-plugins-dir",
            "/p",
            "--cdi-dir",
            "/cdi",
        ]))
        .unwrap() else {
            panic!("serve")
        };
        assert_eq!(c.frontend, Frontend::Dra);
        assert_eq!(c.dra.driver, "rdma.example.com");
        assert_eq!(c.dra.node_name.as_deref(), Some("n-1.example"));
        assert_eq!(c.dra.kube_api.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(c.dra.token_file, Path::new("/t"));
        assert_eq!(c.dra.ca_file, Path::new("/c"));
        assert_eq!(
            c.dra.registration_socket(),
            Path::new("/r/rdma.example.com-reg.sock")
        );
        assert_eq!(
            c.dra.service_socket(),
            Path::new("/p/rdma.example.com/dra.sock")
        );
        assert_eq!(c.cdi_dir, Path::new("/cdi"));
    }

    #[test]
    fn bad_values_name_the_problem() {
        let cases: &[(&[&str], &str)] = &[
            (&["--shares", "0"], "--shares"),
            (&["--shares", "x"], "--shares"),
            (&["--frontend", "grpc"], "device-plugin or dra"),
            (&["--driver-name", "x"], "goes with --frontend dra"),
            (&["--shares", "5000"], "--shares"),
            (&["--resource-name", "rdma"], "no '/'"),
            (&["--resource-name", "a/b/c"], "more than one"),
            (&["--resource-name", "Jarvice.com/rdma"], "DNS subdomain"),
            (&["--resource-name", "kubernetes.io/rdma"], "reserved"),
            (&["--resource-name", "jarvice.com/-x"], "alphanumeric"),
            (&["--plugin-dir", "relative/dir"], "absolute"),
            (&["--host-root", ""], "absolute"),
            (&["--socket-name", "a/b.sock"], "plain file name"),
            (&["--socket-name", "kubelet.sock"], "plain file name"),
            (
                &["--socket-name", "kubelet_internal_checkpoint"],
                "kubelet's own files",
            ),
            (&["--poll-interval", "0"], "--poll-interval"),
            (&["--register-timeout", "0"], "--register-timeout"),
            (&["--bogus"], "bogus"),
            (&["frobnicate"], "unknown command"),
            (&["serve", "--json"], "--json"),
            (&["list", "extra"], "unexpected argument"),
        ];
        for (a, want) in cases {
            let err = parse(&args(a)).unwrap_err();
            assert!(err.to_string().contains(want), "{a:?}: {err}");
        }
        #[cfg(feature = "dra")]
        let dra_cases: &[(&[&str], &str)] = &[
            (
                &["--frontend", "dra", "--driver-name", "Bad_Name"],
                "DNS subdomain",
            ),
            (&["--frontend", "dra", "--node-name", "a/b"], "node name"),
            (&["--frontend", "dra", "--kube-api", "ftp://x"], "http"),
            (
                &["--frontend", "dra", "--kube-token-file", "rel"],
                "absolute",
            ),
            (&["--frontend", "dra", "--cdi"], "every prepared claim"),
        ];
        // The card's binary says why it cannot be the DRA driver.
        #[cfg(not(feature = "dra"))]
        let dra_cases: &[(&[&str], &str)] =
            &[(&["--frontend", "dra"], "without the `dra` feature")];
        for (a, want) in dra_cases {
            let err = parse(&args(a)).unwrap_err();
            assert!(err.to_string().contains(want), "{a:?}: {err}");
        }
        let long = format!("/{}", "d".repeat(120));
        let err = parse(&args(&["--plugin-dir", &long])).unwrap_err();
        assert!(err.to_string().contains("at most 107"), "{err}");
    }

    #[test]
    fn help_lists_every_flag_with_default() {
        let help = usage();
        for flag in [
            "--plugin-dir",
            "--socket-name",
            "--resource-name",
            "--host-root",
            "--sysfs",
            "--shares",
            "--mad-devices",
            "--poll-interval",
            "--self-check",
            "--register-timeout",
            "--poll",
            "--hcas",
            "--link-layer",
            "--pci-ids",
            "--pci-addrs",
            "--health",
            "--health-interval",
            "--hold-down",
            "--resource",
            "--hca-envs",
            "--cdi",
            "--cdi-dir",
            "--cdi-only",
            "--cdi-device-specs",
            "--json",
            "--help",
            "--version",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        assert!(help.contains("jarvice.com/rdma]"));
    }
}
