//! Test support: a fake kubelet that speaks real gRPC over real unix sockets (it serves
//! `Registration` on `kubelet.sock` and dials the plugin back like the kubelet does), the real
//! plugin binary as a child process, and temp trees with plain files as mock device nodes.
//! Also used by the demo (`examples/demo.rs`) and the benchmark (`bench/`).
#![allow(dead_code)]

#[cfg(feature = "dra")]
pub mod dra_kubelet;
pub mod fake_api;
#[cfg(feature = "metrics")]
pub mod scrape;

use std::fs;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures_core::Stream;
use grpcio::{
    CallOption, ChannelBuilder, EnvBuilder, Environment, RpcContext, RpcStatus, RpcStatusCode,
    Server, ServerBuilder, ServerCredentials, UnarySink,
};
use rdma_plugin::host::mock::{self, MockHca};
use rdma_plugin::kubelet::api;
use rdma_plugin::wake;

/// Upper bound of every wait in the tests; generous for a loaded 2-core CI machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// A directory under the system temp dir, removed on drop; short, so socket paths fit.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rdma-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A node's world: a host root with mock device nodes and a kubelet plugin dir.
pub struct Host {
    pub tmp: TempDir,
}

impl Host {
    /// A host with `uverbs0`, `uverbs1` and `rdma_cm` (plain files stand in for char devices).
    pub fn new(tag: &str) -> Host {
        let h = Host::empty(tag);
        for n in ["uverbs0", "uverbs1", "rdma_cm"] {
            h.add_node(n);
        }
        h
    }

    /// A host with the plugin dir and `/dev`, but no RDMA driver loaded.
    pub fn empty(tag: &str) -> Host {
        let tmp = TempDir::new(tag);
        fs::create_dir_all(tmp.0.join("plugins")).unwrap();
        fs::create_dir_all(tmp.0.join("root/dev")).unwrap();
        Host { tmp }
    }

    pub fn root(&self) -> PathBuf {
        self.tmp.0.join("root")
    }

    pub fn plugin_dir(&self) -> PathBuf {
        self.tmp.0.join("plugins")
    }

    pub fn socket(&self) -> PathBuf {
        self.plugin_dir().join("rdma.sock")
    }

    /// Creates `<root>/dev/infiniband/<name>`.
    pub fn add_node(&self, name: &str) {
        let dir = self.root().join("dev/infiniband");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), b"").unwrap();
    }

    /// The host's sysfs (`--sysfs`).
    pub fn sys(&self) -> PathBuf {
        self.root().join("sys")
    }

    /// Adds an HCA to sysfs, laid out as the kernel does, and its nodes to `/dev/infiniband`.
    pub fn add_hca(&self, hca: &MockHca) {
        mock::add_hca(&self.sys(), Some(&self.root().join("dev")), hca).unwrap();
    }

    /// A host with InfiniBand HCAs `mlx5_0` (`uverbs1`) and `mlx5_1` (`uverbs0`), a RoCE NIC
    /// `mlx5_2` (`uverbs2`), all ports ACTIVE, `rdma_cm`, RDMA netns mode shared.
    pub fn with_hcas(tag: &str) -> Host {
        let h = Host::empty(tag);
        h.add_hca(&MockHca::connectx(0).uverbs(1));
        h.add_hca(&MockHca::connectx(1).uverbs(0).numa(1));
        h.add_hca(&MockHca::roce(2));
        mock::add_rdma_cm(&h.sys(), Some(&h.root().join("dev"))).unwrap();
        mock::set_netns_mode(&h.sys(), true).unwrap();
        h
    }

    /// Sets a port's state and phys_state (e.g. `mock::DOWN_POLLING`).
    pub fn set_port(&self, hca: &str, port: u32, state: (&str, &str)) {
        mock::set_port(&self.sys(), hca, port, state).unwrap();
    }

    pub fn remove_node(&self, name: &str) {
        fs::remove_file(self.root().join("dev/infiniband").join(name)).unwrap();
    }

    /// The arguments that point the plugin at this host.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--plugin-dir".into(),
            self.plugin_dir().display().to_string(),
            "--host-root".into(),
            self.root().display().to_string(),
            "--sysfs".into(),
            self.root().join("sys").display().to_string(),
        ]
    }
}

/// Path of the plugin binary: `$JARVICE_RDMA_PLUGIN_BIN` when set, else the one cargo built for
/// this test run; for the demo and the benchmark (examples, where cargo sets no such variable)
/// the binary beside `target/<profile>/examples/`.
pub fn plugin_bin() -> PathBuf {
    // First, so the suite can be pointed at another build (an older one, to see a test fail).
    if let Some(p) = std::env::var_os("JARVICE_RDMA_PLUGIN_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_jarvice-rdma-plugin") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("jarvice-rdma-plugin"))
        .expect("target/<profile>/ above examples/")
}

/// Runs the plugin binary with `args` (a subcommand and flags) against `host`, to its end.
pub fn run(host: &Host, args: &[&str]) -> std::process::Output {
    plugin_command()
        .args(args)
        .args(host.args())
        .output()
        .expect("run plugin binary")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A character device at `path` (root only); false where mknod is not permitted.
pub fn mknod(path: &Path, major: u32, minor: u32) -> bool {
    rdma_plugin::sys::make_char_device(path, major, minor).is_ok()
}

/// Resource limits a test sets in the plugin's process.
#[derive(Clone, Copy)]
pub enum Rlimit {
    Nofile,
    As,
    Memlock,
}

/// Sets `which` to `soft`/`hard` (bytes or descriptors; `u64::MAX`: unlimited) in the child
/// between fork and exec.
pub fn with_limit(which: Rlimit, soft: u64, hard: u64) -> impl FnOnce(&mut Command) {
    use std::os::unix::process::CommandExt;
    // The constants' type differs between glibc and musl: let each target infer it.
    let resource = match which {
        Rlimit::Nofile => libc::RLIMIT_NOFILE,
        Rlimit::As => libc::RLIMIT_AS,
        Rlimit::Memlock => libc::RLIMIT_MEMLOCK,
    };
    // rlim_t is not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    let lim = |v: u64| {
        if v == u64::MAX {
            libc::RLIM_INFINITY
        } else {
            v as libc::rlim_t
        }
    };
    let (soft, hard) = (lim(soft), lim(hard));
    move |cmd| {
        // SAFETY (test): only setrlimit, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(resource, &l) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

/// True when the plugin runs under an emulator (`$JARVICE_TEST_RUNNER`, e.g. qemu-user): then
/// resource limits and `/proc` figures (RSS, address space) are the emulator's, not the
/// plugin's, and the tests that measure them say so and skip that part.
pub fn under_emulation() -> bool {
    std::env::var("JARVICE_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty())
}

/// Whether the tests may run the plugin in a mount namespace of its own (`unshare -m`, to bind
/// a hostPath-like mount): root with CAP_SYS_ADMIN, and not under an emulator.
pub fn mount_namespaces() -> bool {
    !under_emulation()
        && Command::new("unshare")
            .args(["-m", "true"])
            .status()
            .is_ok_and(|s| s.success())
}

/// A command that runs the plugin binary. A binary for another architecture (ppc64le tests on
/// x86_64) goes through `$JARVICE_TEST_RUNNER` (e.g. `qemu-ppc64le -L /usr/powerpc64le-linux-gnu`),
/// since the kernel cannot exec it directly without binfmt_misc.
pub fn plugin_command() -> Command {
    let runner = std::env::var("JARVICE_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(plugin_bin());
            cmd
        }
        None => Command::new(plugin_bin()),
    }
}

/// The real plugin binary, running; killed on drop. Its log goes to a file in the host dir.
pub struct Plugin {
    pub child: Child,
    pub log: PathBuf,
}

impl Plugin {
    pub fn start(host: &Host, extra: &[&str]) -> Plugin {
        Plugin::start_with(host, extra, |_| {})
    }

    pub fn start_with(host: &Host, extra: &[&str], tweak: impl FnOnce(&mut Command)) -> Plugin {
        static N: AtomicUsize = AtomicUsize::new(0);
        let log = host
            .tmp
            .0
            .join(format!("plugin-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = plugin_command();
        cmd.args(host.args())
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        tweak(&mut cmd);
        let child = cmd.spawn().expect("start plugin binary");
        Plugin { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY (test): kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (for events with no other outside sign).
    pub fn wait_log(&self, needle: &str) -> bool {
        wait_for(WAIT, || self.log_text().contains(needle))
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- plugin log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Peak resident memory of a process (`VmHWM`), KiB, from /proc.
pub fn peak_rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Threads and open descriptors of a process, from /proc.
pub fn threads_and_fds(pid: i32) -> (usize, usize) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (threads, fds)
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// What the fake kubelet saw, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// A Register call, after the dial-back's GetDevicePluginOptions answered `options`.
    Registered {
        req: api::RegisterRequest,
        options: api::DevicePluginOptions,
    },
    /// A Register call the fake refused because dialing back failed.
    DialBackFailed(String),
    /// One ListAndWatch message.
    List(api::ListAndWatchResponse),
    /// The ListAndWatch stream ended (plugin stopped or restarted).
    StreamEnded,
}

/// Which `:authority` the fake sends when dialing back (kubelet >= 1.26: `localhost`; before:
/// the socket path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authority {
    Localhost,
    SocketPath,
}

/// How the fake kubelet behaves.
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub authority: Authority,
    /// Answer Register only after this delay (dial-back still happens first).
    pub register_delay: Duration,
    /// After answering Register, open ListAndWatch; when false, never watch.
    pub watch: bool,
    /// At start, delete every socket in the plugin dir (ours included) like the kubelet's
    /// device manager does; when false, only bind `kubelet.sock` (replacing a stale one).
    pub clean: bool,
}

impl Default for Behaviour {
    fn default() -> Behaviour {
        Behaviour {
            authority: Authority::Localhost,
            register_delay: Duration::ZERO,
            watch: true,
            clean: true,
        }
    }
}

/// What the fake kubelet knows per resource: Register calls and the latest list.
#[derive(Default)]
pub struct PerResource {
    pub registers: std::collections::HashMap<String, usize>,
    pub lists: std::collections::HashMap<String, api::ListAndWatchResponse>,
}

#[derive(Clone)]
struct Registrar {
    by_resource: Arc<Mutex<PerResource>>,
    by_resource_changed: Arc<Condvar>,
    dir: PathBuf,
    behaviour: Behaviour,
    env: Arc<Environment>,
    events: Sender<(Instant, Event)>,
    /// Watch streams still open, so a test can end them (kubelet "drops" a stream).
    streams: Arc<Mutex<Vec<grpcio::ClientSStreamReceiver<api::ListAndWatchResponse>>>>,
    /// Set when the fake stops, to end `register_delay` waits early.
    stopped: Arc<(Mutex<bool>, Condvar)>,
}

impl api::Registration for Registrar {
    fn register(
        &mut self,
        ctx: RpcContext<'_>,
        req: api::RegisterRequest,
        sink: UnarySink<api::Empty>,
    ) {
        let me = self.clone();
        // Off the completion-queue thread: the dial-back blocks, as in the kubelet's goroutine.
        let _ = ctx;
        thread::spawn(move || me.handle(req, sink));
    }
}

impl Registrar {
    fn plugin_client(&self, endpoint: &str) -> api::DevicePluginClient {
        let socket = self.dir.join(endpoint);
        let authority = match self.behaviour.authority {
            Authority::Localhost => "localhost".to_string(),
            Authority::SocketPath => socket.display().to_string(),
        };
        let ch = ChannelBuilder::new(Arc::clone(&self.env))
            .default_authority(authority)
            .use_local_subchannel_pool(true)
            .connect(&format!("unix:{}", socket.display()));
        api::DevicePluginClient::new(ch)
    }

    fn handle(self, req: api::RegisterRequest, sink: UnarySink<api::Empty>) {
        let client = self.plugin_client(&req.endpoint);
        let resource = req.resource_name.clone();
        let opt = CallOption::default()
            .timeout(Duration::from_secs(10))
            .wait_for_ready(true);
        let status = match client.get_device_plugin_options_opt(&api::Empty::new(), opt) {
            Ok(options) => {
                *self
                    .by_resource
                    .lock()
                    .unwrap()
                    .registers
                    .entry(resource.clone())
                    .or_default() += 1;
                let _ = self
                    .events
                    .send((Instant::now(), Event::Registered { req, options }));
                // Hold the answer back, but not past stop(): a live call keeps gRPC's shutdown waiting.
                let (lock, cond) = &*self.stopped;
                let stopped = lock.lock().unwrap();
                let _ = cond
                    .wait_timeout_while(stopped, self.behaviour.register_delay, |s| !*s)
                    .unwrap();
                let _ = wake::block_on(sink.success(api::Empty::new()), Some(WAIT));
                None
            }
            Err(e) => {
                let msg = format!("dial back failed: {e}");
                let _ = self
                    .events
                    .send((Instant::now(), Event::DialBackFailed(msg.clone())));
                let _ = wake::block_on(
                    sink.fail(RpcStatus::with_message(RpcStatusCode::UNKNOWN, msg)),
                    Some(WAIT),
                );
                Some(())
            }
        };
        if status.is_none() && self.behaviour.watch {
            self.watch(client, resource);
        }
    }

    fn watch(self, client: api::DevicePluginClient, resource: String) {
        let Ok(stream) = client.list_and_watch(&api::Empty::new()) else {
            let _ = self.events.send((Instant::now(), Event::StreamEnded));
            return;
        };
        let idx = {
            let mut s = self.streams.lock().unwrap();
            s.push(stream);
            s.len() - 1
        };
        loop {
            // Poll under the lock only briefly: drop_streams may cancel concurrently.
            let next = wake::block_on(
                std::future::poll_fn(|cx| {
                    let mut s = self.streams.lock().unwrap();
                    match s.get_mut(idx) {
                        Some(st) => Pin::new(st).poll_next(cx),
                        None => std::task::Poll::Ready(None),
                    }
                }),
                None,
            );
            match next {
                Some(Some(Ok(list))) => {
                    {
                        let mut b = self.by_resource.lock().unwrap();
                        b.lists.insert(resource.clone(), list.clone());
                        self.by_resource_changed.notify_all();
                    }
                    if self
                        .events
                        .send((Instant::now(), Event::List(list)))
                        .is_err()
                    {
                        return;
                    }
                }
                _ => {
                    let _ = self.events.send((Instant::now(), Event::StreamEnded));
                    return;
                }
            }
        }
    }
}

/// A kubelet stand-in on `<dir>/kubelet.sock`.
pub struct FakeKubelet {
    server: Option<Server>,
    dir: PathBuf,
    pub events: Receiver<(Instant, Event)>,
    streams: Arc<Mutex<Vec<grpcio::ClientSStreamReceiver<api::ListAndWatchResponse>>>>,
    stopped: Arc<(Mutex<bool>, Condvar)>,
    /// Device and inode of the kubelet.sock this kubelet bound: it removes only that one.
    sock: Option<(u64, u64)>,
    /// Remove kubelet.sock at shutdown (a crashed kubelet leaves it behind).
    remove_sock: bool,
    by_resource: Arc<Mutex<PerResource>>,
    by_resource_changed: Arc<Condvar>,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl FakeKubelet {
    /// Starts like the kubelet: removes every non-directory entry of the plugin dir except
    /// `kubelet_internal_checkpoint` (so every plugin socket goes), then serves `kubelet.sock`.
    pub fn start(dir: &Path) -> FakeKubelet {
        FakeKubelet::start_with(dir, Behaviour::default())
    }

    pub fn start_with(dir: &Path, behaviour: Behaviour) -> FakeKubelet {
        let clean = behaviour.clean;
        if !clean {
            let _ = fs::remove_file(dir.join("kubelet.sock"));
        }
        for entry in fs::read_dir(dir).unwrap().flatten().filter(|_| clean) {
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir && entry.file_name() != "kubelet_internal_checkpoint" {
                let _ = fs::remove_file(entry.path());
            }
        }
        let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("kubelet").build());
        let (tx, rx) = mpsc::channel();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let stopped = Arc::new((Mutex::new(false), Condvar::new()));
        let by_resource = Arc::new(Mutex::new(PerResource::default()));
        let by_resource_changed = Arc::new(Condvar::new());
        let registrar = Registrar {
            by_resource: Arc::clone(&by_resource),
            by_resource_changed: Arc::clone(&by_resource_changed),
            dir: dir.to_path_buf(),
            behaviour,
            env: Arc::clone(&env),
            events: tx,
            streams: Arc::clone(&streams),
            stopped: Arc::clone(&stopped),
        };
        let mut server = ServerBuilder::new(env)
            .register_service(api::create_registration(registrar))
            .build()
            .unwrap();
        server
            .add_listening_port(
                format!("unix:{}", dir.join("kubelet.sock").display()),
                ServerCredentials::insecure(),
            )
            .unwrap();
        server.start();
        FakeKubelet {
            server: Some(server),
            dir: dir.to_path_buf(),
            events: rx,
            streams,
            stopped,
            sock: file_id(&dir.join("kubelet.sock")),
            remove_sock: true,
            by_resource,
            by_resource_changed,
        }
    }

    /// The next event if one comes within `timeout` (to show that nothing happens).
    pub fn next_within(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok().map(|(_, ev)| ev)
    }

    /// Next event within [`WAIT`]; panics with `what` if none comes.
    pub fn next(&self, what: &str) -> Event {
        match self.events.recv_timeout(WAIT) {
            Ok((_, ev)) => ev,
            Err(RecvTimeoutError::Timeout) => {
                panic!("fake kubelet: no event within {WAIT:?} waiting for {what}")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("fake kubelet: event channel closed"),
        }
    }

    /// Skips events until `pick` accepts one.
    pub fn expect<T>(&self, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        let end = Instant::now() + WAIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((_, ev)) => {
                    if let Some(t) = pick(&ev) {
                        return t;
                    }
                }
                Err(_) => panic!("fake kubelet: no event within {WAIT:?} waiting for {what}"),
            }
        }
    }

    pub fn expect_registered(&self) -> (api::RegisterRequest, api::DevicePluginOptions) {
        self.expect("Register", |ev| match ev {
            Event::Registered { req, options } => Some((req.clone(), options.clone())),
            _ => None,
        })
    }

    pub fn expect_list(&self) -> api::ListAndWatchResponse {
        self.expect("a ListAndWatch message", |ev| match ev {
            Event::List(l) => Some(l.clone()),
            _ => None,
        })
    }

    /// Skips lists until one where every device has health `want` ("Healthy"/"Unhealthy").
    pub fn expect_health(&self, want: &'static str) -> api::ListAndWatchResponse {
        self.expect(want, |ev| match ev {
            Event::List(l) if l.devices.iter().all(|d| d.health == want) => Some(l.clone()),
            _ => None,
        })
    }

    /// Cancels every open ListAndWatch stream, like a kubelet that drops the stream.
    pub fn drop_streams(&self) {
        for s in self.streams.lock().unwrap().iter_mut() {
            s.cancel();
        }
    }

    /// Stops serving and removes `kubelet.sock`, like a kubelet that went away.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        *self.stopped.0.lock().unwrap() = true;
        self.stopped.1.notify_all();
        self.drop_streams();
        if let Some(mut s) = self.server.take() {
            let done = s.shutdown();
            // Register calls held back by `register_delay` would otherwise keep it waiting.
            s.cancel_all_calls();
            let _ = wake::block_on(done, Some(WAIT));
        }
        // Once: a later drop must not remove a new kubelet's socket (inode numbers are reused).
        let path = self.dir.join("kubelet.sock");
        if let Some(id) = self.sock.take() {
            if self.remove_sock && file_id(&path) == Some(id) {
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Register calls this kubelet answered for `resource` so far (events are not consumed).
    pub fn registers_of(&self, resource: &str) -> usize {
        let b = self.by_resource.lock().unwrap();
        b.registers.get(resource).copied().unwrap_or(0)
    }

    /// Waits (within [`WAIT`]) for a list of `resource` that `ok` accepts; panics otherwise.
    pub fn wait_list(
        &self,
        resource: &str,
        what: &str,
        ok: impl Fn(&api::ListAndWatchResponse) -> bool,
    ) -> api::ListAndWatchResponse {
        let end = Instant::now() + WAIT;
        let mut b = self.by_resource.lock().unwrap();
        loop {
            if let Some(l) = b.lists.get(resource).filter(|l| ok(l)) {
                return l.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "fake kubelet: no list of {resource} with {what} within {WAIT:?}; latest: {:?}",
                b.lists.get(resource)
            );
            b = self.by_resource_changed.wait_timeout(b, left).unwrap().0;
        }
    }

    /// Stops like a killed kubelet: serving ends, `kubelet.sock` stays behind (the same file,
    /// refusing connections).
    pub fn crash(&mut self) {
        self.remove_sock = false;
        // gRPC unlinks its socket file when the server shuts down, which a killed process
        // cannot: keep the file under a second name and put it back.
        let path = self.dir.join("kubelet.sock");
        let keep = self.dir.join(".kubelet.sock.crashed");
        let kept = fs::hard_link(&path, &keep).is_ok();
        self.shutdown();
        if kept {
            fs::rename(&keep, &path).unwrap();
        }
    }

    /// Stops serving and removes its own `kubelet.sock`, keeping the events to count.
    pub fn stop_in_place(&mut self) {
        self.shutdown();
    }

    /// How many Register calls this kubelet answered (drains its events).
    pub fn registrations(&self) -> usize {
        self.events
            .try_iter()
            .filter(|(_, ev)| matches!(ev, Event::Registered { .. }))
            .count()
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A client of the plugin, as the kubelet would be (authority `localhost`).
pub fn plugin_client(socket: &Path) -> api::DevicePluginClient {
    plugin_client_as(socket, Authority::Localhost)
}

pub fn plugin_client_as(socket: &Path, authority: Authority) -> api::DevicePluginClient {
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("client").build());
    let authority = match authority {
        Authority::Localhost => "localhost".to_string(),
        Authority::SocketPath => socket.display().to_string(),
    };
    let ch = ChannelBuilder::new(env)
        .default_authority(authority)
        .use_local_subchannel_pool(true)
        .connect(&format!("unix:{}", socket.display()));
    api::DevicePluginClient::new(ch)
}

/// The usual start: a kubelet, then the plugin with `extra` flags, registered and listed.
pub fn start_registered(host: &Host, extra: &[&str]) -> (FakeKubelet, Plugin) {
    let kubelet = FakeKubelet::start(&host.plugin_dir());
    let plugin = Plugin::start(host, extra);
    kubelet.expect_registered();
    kubelet.expect_list();
    (kubelet, plugin)
}

/// The next message of a ListAndWatch stream, within [`WAIT`].
pub fn next_list(
    stream: &mut grpcio::ClientSStreamReceiver<api::ListAndWatchResponse>,
) -> Option<Option<grpcio::Result<api::ListAndWatchResponse>>> {
    wake::block_on(
        std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)),
        Some(WAIT),
    )
}

/// Opens a ListAndWatch stream as a second client and reads its first list.
pub fn open_watch(
    client: &api::DevicePluginClient,
) -> grpcio::ClientSStreamReceiver<api::ListAndWatchResponse> {
    let mut stream = client
        .list_and_watch_opt(&api::Empty::new(), opt())
        .expect("ListAndWatch");
    let first = next_list(&mut stream);
    assert!(matches!(first, Some(Some(Ok(_)))), "first list: {first:?}");
    stream
}

/// The status of a call that must fail; panics naming `want` if it succeeded.
pub fn rpc_status<T: std::fmt::Debug>(result: grpcio::Result<T>, want: RpcStatusCode) -> RpcStatus {
    match result {
        Err(grpcio::Error::RpcFailure(status)) => {
            assert_eq!(status.code(), want, "{}", status.message());
            status
        }
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

/// Call options for test RPCs: bounded, and waiting for the socket to accept.
pub fn opt() -> CallOption {
    CallOption::default().timeout(WAIT).wait_for_ready(true)
}

pub fn alloc_request(containers: &[&[&str]]) -> api::AllocateRequest {
    let mut req = api::AllocateRequest::new();
    for ids in containers {
        let mut c = api::ContainerAllocateRequest::new();
        c.devices_ids = ids.iter().map(|s| s.to_string()).collect();
        req.container_requests.push(c);
    }
    req
}

/// One container's GetPreferredAllocation over `client`: `size` of `available`, with `must`.
pub fn preferred(
    client: &api::DevicePluginClient,
    available: &[String],
    must: &[String],
    size: i32,
) -> Vec<String> {
    let mut c = api::ContainerPreferredAllocationRequest::new();
    c.available_deviceIDs = available.to_vec();
    c.must_include_deviceIDs = must.to_vec();
    c.allocation_size = size;
    let mut req = api::PreferredAllocationRequest::new();
    req.container_requests.push(c);
    client
        .get_preferred_allocation_opt(&req, opt())
        .unwrap()
        .container_responses[0]
        .deviceIDs
        .clone()
}

/// The host paths of one container's device specs.
pub fn spec_paths(c: &api::ContainerAllocateResponse) -> Vec<String> {
    c.devices.iter().map(|d| d.host_path.clone()).collect()
}

pub fn healths(list: &api::ListAndWatchResponse) -> Vec<(String, String)> {
    list.devices
        .iter()
        .map(|d| (d.ID.clone(), d.health.clone()))
        .collect()
}
