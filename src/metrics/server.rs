//! The `/metrics` endpoint: one thread, `poll(2)` over the listener and at most
//! [`MAX_CONNECTIONS`] connections, each with [`DEADLINE`] for the whole exchange and at most
//! [`MAX_REQUEST`] bytes of request head (parsed by `httparse`). One answer per connection
//! (`Connection: close`), so no idle keep-alive holds a slot.
//!
//! Why not a server crate: `tiny_http` (the small synchronous one) starts a thread for every
//! connection with no limit and no read timeout (`util/task_pool.rs`), so 10,000 idle
//! connections would be 10,000 threads in a pod whose pid limit gRPC needs too. Here a hostile
//! client costs one slot for at most five seconds, a flood past the slots is answered 503 and
//! closed, and memory stays bounded by the slots. With no connection the thread sleeps in
//! `poll` with no timeout: no wake-ups of ours when nobody scrapes.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::metrics::render;
use crate::observe::Observer;
use crate::sys;

/// Connections served at once; more are answered 503 and closed. Fewer under a low open-files
/// limit: a quarter of it at most, so that scrapers can never take the descriptors gRPC needs.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request head we read (Prometheus sends about 300 bytes).
pub const MAX_REQUEST: usize = 8 << 10;
/// From accept to the last byte of the answer.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Connections closed unanswered are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// While the address cannot be bound (taken, not there yet), tried again this often.
const BIND_RETRY: Duration = Duration::from_secs(30);
/// With no descriptor left to accept with (EMFILE), the listener stays readable: it is left out
/// of `poll` this long rather than woken for in a loop.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The slots for an open-files limit of `nofile` (`None`: unlimited).
pub fn slots(nofile: Option<u64>) -> usize {
    nofile.map_or(MAX_CONNECTIONS, |n| {
        (n / 4).clamp(1, MAX_CONNECTIONS as u64) as usize
    })
}

struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    answer: Vec<u8>,
    written: usize,
    deadline: Instant,
}

enum Step {
    Keep,
    Close(Option<&'static str>),
}

/// Starts the endpoint's thread. The address is bound there: a port that is taken is a
/// warning and a retry, never a reason to stop serving RDMA.
pub fn spawn(addr: SocketAddr, observer: Arc<Observer>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("metrics".into())
        .stack_size(512 << 10)
        .spawn(move || {
            let listener = bind(addr);
            if let Err(e) = serve(&listener, &observer) {
                warn!("metrics endpoint {addr} stopped: {e}");
            }
        })
        .map(|_| ())
}

fn bind(addr: SocketAddr) -> TcpListener {
    let mut warned = false;
    loop {
        match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => {
                // The bound address: with port 0 the kernel picks the port.
                let at = l.local_addr().unwrap_or(addr);
                info!("metrics on http://{at}/metrics");
                return l;
            }
            Err(e) => {
                if !warned {
                    warn!("cannot serve metrics on {addr}: {e}; trying again every {BIND_RETRY:?}");
                    warned = true;
                }
                std::thread::sleep(BIND_RETRY);
            }
        }
    }
}

/// The loop; returns only when `poll` itself fails.
pub fn serve(listener: &TcpListener, observer: &Observer) -> io::Result<()> {
    let mut conns: Vec<Conn> = Vec::new();
    let mut paused_until: Option<Instant> = None;
    let mut turned_away = TurnedAway::default();
    loop {
        if paused_until.is_some_and(|t| t <= Instant::now()) {
            paused_until = None;
        }
        let mut fds = Vec::with_capacity(conns.len() + 1);
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: if paused_until.is_some() {
                0
            } else {
                libc::POLLIN
            },
            revents: 0,
        });
        for c in &conns {
            let events = if c.answer.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLOUT
            };
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        let timeout = conns
            .iter()
            .map(|c| c.deadline)
            .chain(paused_until)
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()));
        sys::poll(&mut fds, timeout)?;
        let now = Instant::now();
        let mut keep = Vec::with_capacity(conns.len());
        for (c, p) in conns.into_iter().zip(&fds[1..]) {
            let mut c = c;
            let step = if p.revents != 0 {
                step(&mut c, observer, &mut turned_away)
            } else if now >= c.deadline {
                Step::Close(Some("timeout"))
            } else {
                Step::Keep
            };
            match step {
                Step::Keep if now < c.deadline => keep.push(c),
                Step::Keep => turned_away.add(observer, "timeout"),
                Step::Close(Some(why)) => turned_away.add(observer, why),
                Step::Close(None) => {}
            }
        }
        conns = keep;
        if fds[0].revents & libc::POLLIN != 0 {
            // Read at every burst: an operator may lower the limit of a running process.
            let nofile = sys::get_limit(sys::LimitKind::Nofile)
                .ok()
                .and_then(|l| l.soft);
            let room = accept(
                listener,
                &mut conns,
                observer,
                &mut turned_away,
                slots(nofile),
            );
            if !room {
                paused_until = Some(Instant::now() + ACCEPT_PAUSE);
            }
        }
        turned_away.tell();
    }
}

/// Connections closed unanswered since the last log line about them: said at most once a
/// minute (a flood must not flood the log), counted in the metrics at once.
#[derive(Default)]
struct TurnedAway {
    since_told: BTreeMap<&'static str, u64>,
    told_at: Option<Instant>,
}

impl TurnedAway {
    fn add(&mut self, observer: &Observer, why: &'static str) {
        observer.count("refused_scrapes", &[("why", why)]);
        *self.since_told.entry(why).or_insert(0) += 1;
    }

    fn tell(&mut self) {
        if self.since_told.is_empty() || self.told_at.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        let what: Vec<String> = self
            .since_told
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        warn!(
            "metrics: connections closed unanswered: {} (at most {} at once, {DEADLINE:?} each, {MAX_REQUEST} bytes of request head)",
            what.join(", "),
            MAX_CONNECTIONS
        );
        self.since_told.clear();
        self.told_at = Some(Instant::now());
    }
}

/// Takes every pending connection; past the slots, each gets a 503 and is closed. False when
/// accepting failed for want of descriptors or memory (the connection stays in the backlog).
fn accept(
    listener: &TcpListener,
    conns: &mut Vec<Conn>,
    observer: &Observer,
    turned_away: &mut TurnedAway,
    slots: usize,
) -> bool {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if conns.len() >= slots {
                    turned_away.add(observer, "busy");
                    let mut s = stream;
                    let _ = s.write(&answer("503 Service Unavailable", "text/plain", b"busy\n"));
                    continue;
                }
                conns.push(Conn {
                    stream,
                    request: Vec::new(),
                    answer: Vec::new(),
                    written: 0,
                    deadline: Instant::now() + DEADLINE,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: the connection waits in the backlog until slots
                // that end free descriptors.
                debug!("metrics: accept: {e}");
                return false;
            }
        }
    }
}

/// Reads what came or writes what can go. A request refused for what it is (too large,
/// malformed) is counted in `turned_away` and answered with its status.
fn step(c: &mut Conn, observer: &Observer, turned_away: &mut TurnedAway) -> Step {
    if !c.answer.is_empty() {
        return match c.stream.write(&c.answer[c.written..]) {
            Ok(n) => {
                c.written += n;
                if c.written == c.answer.len() {
                    Step::Close(None)
                } else {
                    Step::Keep
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Keep,
            Err(_) => Step::Close(None),
        };
    }
    let mut buf = [0u8; 2048];
    let mut eof = false;
    loop {
        match c.stream.read(&mut buf) {
            // Half-closed after the request (`nc -N`, some probes): answer what came.
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                if c.request.len() + n > MAX_REQUEST {
                    c.answer = answer(
                        "431 Request Header Fields Too Large",
                        "text/plain",
                        b"request too large\n",
                    );
                    turned_away.add(observer, "too_large");
                    return Step::Keep;
                }
                c.request.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return Step::Close(None),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&c.request) {
        Ok(httparse::Status::Partial) if eof => Step::Close(None),
        Ok(httparse::Status::Partial) => Step::Keep,
        Ok(httparse::Status::Complete(_)) => {
            c.answer = respond(req.method, req.path, observer);
            Step::Keep
        }
        Err(e) => {
            debug!("metrics: bad request: {e}");
            turned_away.add(observer, "bad_request");
            c.answer = answer("400 Bad Request", "text/plain", b"bad request\n");
            Step::Keep
        }
    }
}

/// The answer to one request: the exposition at `/metrics`, a pointer to it at `/`.
fn respond(method: Option<&str>, path: Option<&str>, observer: &Observer) -> Vec<u8> {
    let mut path = path.unwrap_or("");
    // The absolute form (`GET http://host:9465/metrics`), which RFC 9112 3.2.2 says a server
    // must accept: the path after the authority.
    if let Some(rest) = path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
    {
        path = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    let path = path.split('?').next().unwrap_or("");
    let head = method == Some("HEAD");
    if !(head || method == Some("GET")) {
        return answer("405 Method Not Allowed", "text/plain", b"GET only\n");
    }
    let (status, kind, body) = match path {
        "/metrics" => (
            "200 OK",
            render::CONTENT_TYPE,
            render::render(&observer.snapshot()).into_bytes(),
        ),
        "/" => (
            "200 OK",
            "text/plain",
            b"jarvice-rdma-plugin: metrics at /metrics\n".to_vec(),
        ),
        _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let mut a = answer(status, kind, &body);
    if head {
        a.truncate(a.len() - body.len());
    }
    a
}

fn answer(status: &str, kind: &str, body: &[u8]) -> Vec<u8> {
    let mut a = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    a.extend_from_slice(body);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_open_files_limit() {
        assert_eq!(slots(None), MAX_CONNECTIONS);
        assert_eq!(slots(Some(1 << 20)), MAX_CONNECTIONS);
        assert_eq!(slots(Some(64)), 16);
        assert_eq!(slots(Some(2)), 1);
    }
}
