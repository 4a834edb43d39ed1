//! The only `unsafe` of the crate: thin wrappers over Linux signalfd, inotify, eventfd and poll.
//! Each returns `io::Error` (via [`cvt`]) instead of -1 and owns its descriptor.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// Turns the C convention (-1 and `errno`) into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn sigset(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    cvt(unsafe { libc::sigemptyset(&mut set) })?;
    for &sig in signals {
        // SAFETY: as above; an invalid signal number is reported through errno.
        cvt(unsafe { libc::sigaddset(&mut set, sig) })?;
    }
    Ok(set)
}

/// Blocks `signals` for the calling thread and every thread it spawns afterwards, so that they
/// are only ever received through a [`SignalFd`] on the main thread. Call before spawning threads.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals)?;
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Delivers blocked signals as readable records.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        let set = sigset(signals)?;
        // SAFETY: -1 asks for a new descriptor; `set` is initialised.
        let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
        // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The next pending signal number, or `None` when none is pending.
    pub fn read(&self) -> io::Result<Option<libc::c_int>> {
        // SAFETY: signalfd_siginfo is plain data, fully written by a successful read.
        let mut info: libc::signalfd_siginfo = unsafe { mem::zeroed() };
        let size = mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is `size` bytes of writable memory owned by this frame.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n == -1 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(info.ssi_signo as libc::c_int))
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One inotify record: the watch it came from, what happened, and the entry name if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InotifyEvent {
    pub wd: libc::c_int,
    pub mask: u32,
    pub name: Vec<u8>,
}

/// An inotify instance (non-blocking).
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    /// Fails with `EMFILE` when `fs.inotify.max_user_instances` is used up.
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: no pointers involved; returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        // SAFETY: inotify_init1 returned a fresh descriptor that nothing else owns.
        Ok(Inotify {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fails with `ENOSPC` when `fs.inotify.max_user_watches` is used up, `ENOENT` if absent.
    pub fn add_watch(&self, path: &Path, mask: u32) -> io::Result<libc::c_int> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        cvt(unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) })
    }

    pub fn rm_watch(&self, wd: libc::c_int) -> io::Result<()> {
        // SAFETY: no pointers; an unknown wd gives EINVAL.
        cvt(unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) }).map(drop)
    }

    /// Reads every queued record; empty when none is queued.
    pub fn read_events(&self) -> io::Result<Vec<InotifyEvent>> {
        let mut events = Vec::new();
        // Aligned for inotify_event; room for many records with names up to NAME_MAX.
        let mut buf = [0u64; 1024];
        loop {
            // SAFETY: `buf` is writable and its byte length is passed.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    mem::size_of_val(&buf),
                )
            };
            if n == -1 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(events),
                    _ => Err(err),
                };
            }
            let n = n as usize;
            // SAFETY: the kernel wrote `n` initialised bytes at the start of `buf`.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            parse_inotify(bytes, &mut events);
        }
    }
}

fn parse_inotify(mut bytes: &[u8], out: &mut Vec<InotifyEvent>) {
    let header = mem::size_of::<libc::inotify_event>();
    while bytes.len() >= header {
        // SAFETY: at least `header` bytes remain; read_unaligned has no alignment demand.
        let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let end = (header + ev.len as usize).min(bytes.len());
        let raw_name = &bytes[header..end];
        let name_len = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        out.push(InotifyEvent {
            wd: ev.wd,
            mask: ev.mask,
            name: raw_name[..name_len].to_vec(),
        });
        bytes = &bytes[end..];
    }
}

impl InotifyEvent {
    pub fn name(&self) -> &OsStr {
        OsStr::from_bytes(&self.name)
    }
}

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A counter other threads bump to wake the main loop's `poll`.
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: no pointers; returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. It fails only when the counter would overflow
        // (then a wake-up is already pending), so the result is not needed.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter so the next `poll` blocks again.
    pub fn drain(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether something listens on the unix socket at `path`, without ever blocking: a plain
/// blocking connect would hang while a listener's backlog is full, freezing the main loop.
/// `Ok(false)` for refused (a stale socket file) or absent.
pub fn socket_answers(path: &Path) -> io::Result<bool> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: no pointers; returns a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: socket returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the duration of the call.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // A listener whose backlog is full: alive, just busy.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(true),
        Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => Ok(false),
        _ => Err(err),
    }
}

/// 64 random bits from the kernel (getrandom(2), which does not block once the pool is ready
/// at boot).
pub fn random_u64() -> io::Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is valid for 8 bytes of writes for the duration of the call.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if n == buf.len() as isize {
        Ok(u64::from_ne_bytes(buf))
    } else if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short getrandom",
        ))
    }
}

/// Whether this process may write in `path` (`access(2)` with `W_OK`, which also refuses on a
/// read-only mount, where root's permission bits say nothing).
pub fn may_write(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// poll(2) over `fds`, each with the events its caller set; `revents` filled on return (none
/// when a signal interrupted the wait).
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    let ms = match timeout {
        None => -1,
        // Round up so a 0.4 ms deadline does not become a busy loop of 0 ms polls.
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if ret == -1 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            fds.iter_mut().for_each(|p| p.revents = 0);
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: forever). Returns which
/// of them are readable. EINTR counts as "nothing ready".
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    poll(&mut pfds, timeout)?;
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_reports_created_name() {
        let dir = std::env::temp_dir().join(format!("rdma-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ino = Inotify::new().unwrap();
        let wd = ino.add_watch(&dir, libc::IN_CREATE).unwrap();
        assert!(ino.read_events().unwrap().is_empty());
        std::fs::write(dir.join("kubelet.sock"), b"").unwrap();
        let ready = poll_readable(&[ino.as_raw_fd()], Some(Duration::from_secs(5))).unwrap();
        assert!(ready[0]);
        let events = ino.read_events().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].wd, wd);
        assert_eq!(events[0].name(), "kubelet.sock");
        assert!(events[0].mask & libc::IN_CREATE != 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn socket_answers_tells_live_from_stale() {
        let dir = std::env::temp_dir().join(format!("rdma-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        assert!(!socket_answers(&path).unwrap(), "absent");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(socket_answers(&path).unwrap(), "listening");
        drop(listener);
        assert!(!socket_answers(&path).unwrap(), "stale file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eventfd_wakes_poll_and_drains() {
        let efd = EventFd::new().unwrap();
        assert!(!poll_readable(&[efd.as_raw_fd()], Some(Duration::ZERO)).unwrap()[0]);
        efd.notify();
        efd.notify();
        assert!(poll_readable(&[efd.as_raw_fd()], Some(Duration::ZERO)).unwrap()[0]);
        efd.drain();
        assert!(!poll_readable(&[efd.as_raw_fd()], Some(Duration::ZERO)).unwrap()[0]);
    }

    #[test]
    fn parse_handles_records_with_and_without_names() {
        let header = mem::size_of::<libc::inotify_event>();
        let mut bytes = Vec::new();
        for (wd, name) in [(1i32, &b"uverbs0\0\0\0\0\0\0\0\0\0"[..]), (2, &b""[..])] {
            let ev = libc::inotify_event {
                wd,
                mask: libc::IN_DELETE,
                cookie: 0,
                len: name.len() as u32,
            };
            // SAFETY (test): inotify_event is plain data of `header` bytes.
            let raw = unsafe { std::slice::from_raw_parts(&ev as *const _ as *const u8, header) };
            bytes.extend_from_slice(raw);
            bytes.extend_from_slice(name);
        }
        let mut out = Vec::new();
        parse_inotify(&bytes, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name(), "uverbs0");
        assert_eq!(out[1].wd, 2);
        assert!(out[1].name.is_empty());
    }
}

/// A resource limit's soft and hard values; `None` is unlimited (`RLIM_INFINITY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// The limits we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// `RLIMIT_MEMLOCK`: what RDMA can register (pin) per process.
    Memlock,
    /// `RLIMIT_NOFILE`: open descriptors.
    Nofile,
}

/// `RLIMIT_*` for `kind`. The constants' type differs between glibc and musl: a macro lets each
/// call site infer it instead of naming it.
macro_rules! resource_of {
    ($kind:expr) => {
        match $kind {
            LimitKind::Memlock => libc::RLIMIT_MEMLOCK,
            LimitKind::Nofile => libc::RLIMIT_NOFILE,
        }
    };
}

fn read_rlimit(kind: LimitKind) -> io::Result<libc::rlimit> {
    // SAFETY: rlimit is plain data; zeroed is a valid value that getrlimit overwrites.
    let mut lim: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: `lim` is a valid, exclusively borrowed rlimit for the duration of the call.
    cvt(unsafe { libc::getrlimit(resource_of!(kind), &mut lim) })?;
    Ok(lim)
}

/// `getrlimit` for `kind`.
pub fn get_limit(kind: LimitKind) -> io::Result<Limit> {
    let lim = read_rlimit(kind)?;
    // rlim_t is not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    let value = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v as u64);
    Ok(Limit {
        soft: value(lim.rlim_cur),
        hard: value(lim.rlim_max),
    })
}

/// `setrlimit` of `kind`'s soft limit to `soft` (`None`: unlimited), keeping the hard limit.
pub fn set_soft_limit(kind: LimitKind, soft: Option<u64>) -> io::Result<()> {
    let mut lim = read_rlimit(kind)?;
    // rlim_t is not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    let soft = soft.map_or(libc::RLIM_INFINITY, |n| n as libc::rlim_t);
    lim.rlim_cur = soft;
    // SAFETY: as above; the kernel validates the values.
    cvt(unsafe { libc::setrlimit(resource_of!(kind), &lim) })?;
    Ok(())
}

/// Sets the process's file-mode creation mask (sockets and files we create from now on).
pub fn set_umask(mask: libc::mode_t) {
    // SAFETY: umask cannot fail and touches no memory.
    unsafe { libc::umask(mask) };
}

/// The termination signals; a teardown that may hang lets them through ([`stoppable`]).
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];
/// After a termination signal, the process ends within this even if gRPC hangs in shutdown.
pub const EXIT_WATCHDOG_SECS: libc::c_uint = 5;

/// A termination signal that arrived during [`stoppable`] (0: none).
static STOP_REQUESTED: AtomicI32 = AtomicI32::new(0);

/// Runs `f`, a gRPC teardown that may never return (gRPC short of threads waits for ever for one
/// it could not start), with the termination signals let through to this thread: the loop that
/// reads them from the signalfd is stuck in `f` meanwhile. One that arrives arms the exit
/// watchdog at once and is kept for [`stop_requested`]. Blocked again when `f` returns.
pub fn stoppable<T>(f: impl FnOnce() -> T) -> T {
    extern "C" fn on_stop(sig: libc::c_int) {
        // The first one arms the watchdog; later ones must not postpone it.
        if STOP_REQUESTED.swap(sig, Ordering::SeqCst) == 0 {
            const MSG: &[u8] =
                b"[INFO ] termination signal received while gRPC was stopping: exiting within 5 s\n";
            // SAFETY: write(2) is async-signal-safe and MSG a static buffer (so are sigaction,
            // sigemptyset and alarm, which the watchdog uses).
            unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
            arm_exit_watchdog(EXIT_WATCHDOG_SECS);
        }
    }
    let Ok(set) = sigset(&STOP_SIGNALS) else {
        return f();
    };
    // SAFETY: sigaction with a zeroed struct, a valid handler and an empty mask, for signals that
    // are blocked on every thread but this one while the mask below is lifted.
    unsafe {
        let mut sa: libc::sigaction = mem::zeroed();
        sa.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in STOP_SIGNALS {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    out
}

/// The termination signal that arrived during a [`stoppable`] teardown, if any.
pub fn stop_requested() -> Option<libc::c_int> {
    match STOP_REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Ends the process `secs` seconds from now unless it has exited by then: the last word when a
/// shutdown hangs (gRPC without threads left cannot finish one). The SIGALRM handler writes one
/// line and exits 0: the stop was asked for, and our sockets were removed before gRPC was.
pub fn arm_exit_watchdog(secs: libc::c_uint) {
    extern "C" fn on_alarm(_: libc::c_int) {
        const MSG: &[u8] =
            b"[WARN ] shutdown still running after the exit watchdog's time: exiting now\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(0);
        }
    }
    // SAFETY: sigaction with a zeroed struct, a valid handler and an empty mask; alarm cannot
    // fail. SIGALRM is not in our blocked set, so the handler runs on whichever thread it hits.
    unsafe {
        let mut sa: libc::sigaction = mem::zeroed();
        sa.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
        libc::alarm(secs);
    }
}

/// glibc reserves 64 MiB of address space for each malloc arena and makes up to 8 per core as
/// threads allocate (gRPC's threads included): ~600 MiB of virtual memory for ~12 MiB of RSS,
/// which an address-space limit (`RLIMIT_AS`) cannot give. Two arenas are plenty for a daemon
/// whose threads rarely allocate at once. musl (the shipped binary) has no arenas.
#[cfg(target_env = "gnu")]
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

#[cfg(not(target_env = "gnu"))]
pub fn limit_malloc_arenas() {}

/// Runs `f` allowed on one CPU, then restores the thread's CPU mask. gRPC C-core reads its CPU
/// count once, in grpcio's `EnvBuilder::new()` (under musl: the CPUs the calling thread may run
/// on), and sizes from it its timer shards (2 per CPU, up to 32, each waking a timer thread
/// about once a second), its event-engine pool (`min(CPUs, 16)` threads at start) and its
/// executor (up to 2 per CPU). A device plugin needs none of that: on a 64-CPU node this is
/// ~64 wake-ups a second and ~20 more threads. Only the calling thread's mask changes, and `f`
/// must start no thread (threads inherit the mask). Where the mask cannot be read or set, `f`
/// runs as is.
pub fn with_one_cpu<T>(f: impl FnOnce() -> T) -> T {
    let size = mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set that sched_getaffinity fills.
    let mut saved: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `saved` is a valid cpu_set_t of `size` bytes for the duration of the call.
    if unsafe { libc::sched_getaffinity(0, size, &mut saved) } != 0 {
        return f();
    }
    // SAFETY: CPU_ISSET reads a valid set; the index is below CPU_SETSIZE.
    let Some(cpu) =
        (0..libc::CPU_SETSIZE as usize).find(|&c| unsafe { libc::CPU_ISSET(c, &saved) })
    else {
        return f();
    };
    // SAFETY: as above; CPU_SET writes a bit of a valid, exclusively borrowed set.
    let mut one: libc::cpu_set_t = unsafe { mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: `one` is a valid cpu_set_t of `size` bytes.
    if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
        return f();
    }
    let out = f();
    // SAFETY: `saved` is the mask read above.
    if unsafe { libc::sched_setaffinity(0, size, &saved) } != 0 {
        log::warn!(
            "cannot restore the CPU mask: {}",
            io::Error::last_os_error()
        );
    }
    out
}

/// `mknod(path, S_IFCHR | 0600, major:minor)`: a character device (root only), for tests and mock
/// trees that need real device numbers.
pub fn make_char_device(path: &Path, major: u32, minor: u32) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `p` is a valid NUL-terminated path for the duration of the call.
    cvt(unsafe {
        libc::mknod(
            p.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    })
    .map(drop)
}

mod grpc_core {
    extern "C" {
        // gRPC C-core, linked in through grpcio-sys.
        pub fn grpc_shutdown();
        pub fn grpc_is_initialized() -> libc::c_int;
    }
}

/// Drops the reference to gRPC's global state that grpcio's `EnvBuilder::build` took (grpcio
/// never drops it). The last one stops gRPC's timer, executor and poller threads, on this thread.
/// Call only once no gRPC object (environment, server, channel, call) is left, from a thread that
/// is not gRPC's.
pub fn grpc_shutdown() {
    // SAFETY: no pointers; balanced with the grpc_init of the environment that was dropped, and
    // called with no gRPC object alive (see above), so nothing uses the state it frees.
    unsafe { grpc_core::grpc_shutdown() }
}

/// Whether gRPC's global state is still up: gRPC keeps a reference of its own while internal
/// work (a connection attempt under way, say) finishes, and ends once that is done.
pub fn grpc_is_initialized() -> bool {
    // SAFETY: no arguments; reads gRPC's init count under its own lock.
    unsafe { grpc_core::grpc_is_initialized() != 0 }
}
