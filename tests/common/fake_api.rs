//! A fake kube-apiserver on 127.0.0.1 for the DRA front-end's tests: real sockets (a thread per
//! connection, no async runtime), HTTP/1.1 with keep-alive, plain or TLS (a CA and a server
//! certificate made at start), bearer-token auth, and the few endpoints a DRA driver calls
//! (nodes, resource claims, resource slices), answering errors with `Status` objects shaped as
//! kube-apiserver's so the client's error handling is tested against the real wire format.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// What a client can make the fake hold: one request's head, and one body (kube-apiserver's own
/// body limit is 3 MiB; a bigger bound here keeps the fake from being the stricter party).
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 8 * 1024 * 1024;
/// `resource.k8s.io/v1` ResourceSliceMaxDevices.
const MAX_DEVICES: usize = 128;
const GROUP: &str = "resource.k8s.io";
const RESOURCE_V1: &str = "resource.k8s.io/v1";
/// kube-apiserver's generateName alphabet (no vowels, no look-alikes), 5 characters appended.
const NAME_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const TOKEN_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A one-shot misbehaviour for the next request whose "METHOD PATH" contains a string.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with a `Status` object for this code (connection kept open).
    Status(u16),
    /// Read the request, send nothing for this long, then close.
    Hang(Duration),
    /// Answer 200 with a valid JSON object of exactly this many bytes (at least ~130).
    Oversized(usize),
    /// Close the connection without answering.
    Close,
    /// Wait this long, then answer normally (with the state as it is then): a slow API server.
    Delay(Duration),
}

/// One request as the fake saw it. `status` is the answer's (logged before it is sent, so a
/// client holding its answer finds it here), 0 while in hand and for `Hang`/`Close`.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// With the query string, as sent (still URL-encoded).
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
    pub status: u16,
    /// Serial number of the TCP connection it came on (1, 2, ...): shows connection reuse.
    pub conn: u64,
}

pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: bool,
    ca_file: Option<PathBuf>,
    token_file: PathBuf,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    /// Clones of the live sockets, so Drop can shut them down (unblocking their threads), and
    /// the threads, so Drop can join them: nothing outlives the FakeApi.
    conns: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct State {
    token: String,
    /// The global resourceVersion counter (etcd's revision).
    rv: u64,
    rng: u64,
    nodes: BTreeMap<String, Value>,
    claims: BTreeMap<(String, String), Value>,
    /// By name: a list comes out in key order, as from etcd.
    slices: BTreeMap<String, Value>,
    /// `events.k8s.io/v1` Events by namespace and name.
    events: BTreeMap<(String, String), Value>,
    faults: Vec<(String, Fault)>,
    requests: Vec<Request>,
}

/// An answer: status code and JSON body. Handlers return `Result<Reply, Reply>` to use `?`.
type Reply = (u16, Value);

impl State {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }
    /// xorshift64*: names and uids only need to differ, not to be secret.
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn rand_string(&mut self, len: usize, chars: &[u8]) -> String {
        let n = chars.len() as u64;
        (0..len)
            .map(|_| chars[(self.rand() % n) as usize] as char)
            .collect()
    }
    fn uid(&mut self) -> String {
        let (a, b) = (self.rand(), self.rand());
        let (a1, a2, a3) = (a >> 32, (a >> 16) & 0xffff, a & 0xfff);
        let (b1, b2) = ((b >> 48) & 0x3fff | 0x8000, b & 0xffff_ffff_ffff);
        format!("{a1:08x}-{a2:04x}-4{a3:03x}-{b1:04x}-{b2:012x}")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the fake down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeApi {
    /// Starts serving at once; writes `dir/fake-api-token` (and `dir/fake-api-ca.crt` with
    /// `tls`), so one FakeApi per dir.
    pub fn start(tls: bool, dir: &Path) -> FakeApi {
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        let seed = now.map_or(1, |d| d.as_nanos() as u64) ^ u64::from(std::process::id()) << 32;
        let mut state = State {
            token: String::new(),
            rv: 1000,
            rng: seed | 1,
            nodes: BTreeMap::new(),
            claims: BTreeMap::new(),
            slices: BTreeMap::new(),
            events: BTreeMap::new(),
            faults: Vec::new(),
            requests: Vec::new(),
        };
        state.token = state.rand_string(40, TOKEN_CHARS);
        let token_file = dir.join("fake-api-token");
        fs::write(&token_file, &state.token).expect("write the fake API's token file");
        let (config, ca_file) = if tls {
            let (config, ca_pem) = tls_config();
            let ca_file = dir.join("fake-api-ca.crt");
            fs::write(&ca_file, ca_pem).expect("write the fake API's CA file");
            (Some(Arc::new(config)), Some(ca_file))
        } else {
            (None, None)
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake API");
        let addr = listener.local_addr().expect("fake API address");
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = thread::Builder::new()
            .name("fake-api-accept".into())
            .spawn(move || accept_loop(listener, sh, config))
            .expect("spawn the fake API's acceptor");
        let acceptor = Some(acceptor);
        FakeApi {
            shared,
            addr,
            tls,
            ca_file,
            token_file,
            acceptor,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca_file.clone()
    }

    pub fn token_file(&self) -> PathBuf {
        self.token_file.clone()
    }

    /// Only this token is accepted from now on; the token file is left alone (a rotation test
    /// rewrites it itself, when it wants).
    pub fn set_token(&self, token: &str) {
        lock(&self.shared.state).token = token.to_string();
    }

    /// Adds a Node; returns its metadata.uid.
    pub fn add_node(&self, name: &str) -> String {
        let mut st = lock(&self.shared.state);
        let (uid, rv) = (st.uid(), st.next_rv());
        let meta = json!({"name": name, "uid": uid, "resourceVersion": rv});
        let node = json!({"kind": "Node", "apiVersion": "v1", "metadata": meta});
        st.nodes.insert(name.to_string(), node);
        uid
    }

    /// Stores or replaces a ResourceClaim (by metadata.namespace/name, namespace "default" when
    /// absent), filling in kind, apiVersion, uid (if absent) and a new resourceVersion.
    pub fn put_claim(&self, mut claim: Value) {
        let mut st = lock(&self.shared.state);
        let (uid, rv) = (st.uid(), st.next_rv());
        let obj = claim.as_object_mut().expect("a claim is a JSON object");
        obj.entry("kind").or_insert_with(|| json!("ResourceClaim"));
        obj.entry("apiVersion")
            .or_insert_with(|| json!(RESOURCE_V1));
        let meta = obj.entry("metadata").or_insert_with(|| json!({}));
        let meta = meta.as_object_mut().expect("claim metadata is an object");
        meta.entry("namespace").or_insert_with(|| json!("default"));
        meta.entry("uid").or_insert_with(|| json!(uid));
        meta.insert("resourceVersion".into(), json!(rv));
        let key = (
            field(&claim, "metadata.namespace"),
            field(&claim, "metadata.name"),
        );
        assert!(!key.1.is_empty(), "a claim needs metadata.name");
        st.claims.insert(key, claim);
    }

    pub fn delete_claim(&self, ns: &str, name: &str) {
        let key = (ns.to_string(), name.to_string());
        lock(&self.shared.state).claims.remove(&key);
    }

    /// Every Event posted, in name order.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared.state).events.values().cloned().collect()
    }

    pub fn slices(&self) -> Vec<Value> {
        lock(&self.shared.state).slices.values().cloned().collect()
    }

    /// What the kubelet does on (re-)registration or plugin removal: delete the node's slices,
    /// optionally only one driver's. Returns how many went.
    pub fn wipe_slices(&self, node: &str, driver: Option<&str>) -> usize {
        let mut st = lock(&self.shared.state);
        let before = st.slices.len();
        let doomed = |s: &Value| {
            field(s, "spec.nodeName") == node
                && driver.iter().all(|d| field(s, "spec.driver") == *d)
        };
        st.slices.retain(|_, s| !doomed(s));
        if st.slices.len() != before {
            st.next_rv();
        }
        before - st.slices.len()
    }

    /// Queues a one-shot fault for the first later request whose "METHOD PATH" (path with
    /// query) contains `path_contains`; faults are consumed in the order queued.
    pub fn fail_next(&self, path_contains: &str, fault: Fault) {
        let fault = (path_contains.to_string(), fault);
        lock(&self.shared.state).faults.push(fault);
    }

    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.state).requests.clone()
    }

    /// Polls `f` every 10 ms until it gives `Some` or `timeout` passes.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&FakeApi) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The acceptor blocks in accept(): a connection of our own wakes it to see `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in lock(&self.shared.conns).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Makes a CA and a server certificate for 127.0.0.1 and localhost signed by it; returns the
/// server's config and the CA's PEM.
fn tls_config() -> (rustls::ServerConfig, String) {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer};
    use rcgen::{ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "fake-kubernetes-ca");
    let ca_pem = ca.self_signed(&ca_key).expect("self-sign the CA").pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().expect("server key");
    let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let mut params = CertificateParams::new(sans).expect("server cert params");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &issuer)
        .expect("sign the server cert");

    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    // An explicit provider: the process-wide default is the product's business, not ours.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key.into())
        .expect("server cert and key");
    (config, ca_pem)
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<Arc<rustls::ServerConfig>>) {
    let mut serial = 0;
    for tcp in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(tcp) = tcp else { continue };
        let Ok(clone) = tcp.try_clone() else { continue };
        serial += 1;
        let id = serial;
        let _ = tcp.set_nodelay(true);
        lock(&shared.conns).insert(id, clone);
        let (sh, tls) = (shared.clone(), tls.clone());
        let spawned = thread::Builder::new()
            .name(format!("fake-api-conn-{id}"))
            .spawn(move || {
                match tls.map(rustls::ServerConnection::new) {
                    Some(Ok(tls)) => serve(&sh, id, rustls::StreamOwned::new(tls, tcp)),
                    Some(Err(_)) => {}
                    None => serve(&sh, id, tcp),
                }
                // Dropping the clone too closes the socket.
                lock(&sh.conns).remove(&id);
            });
        let mut threads = lock(&shared.threads);
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => drop(lock(&shared.conns).remove(&id)),
        }
    }
}

/// A connection, plain or TLS, that can be ended politely or abruptly.
trait Conn: Read + Write {
    fn socket(&mut self) -> &mut TcpStream;
    fn close_notify(&mut self) {}

    fn finish(&mut self) {
        self.close_notify();
        let _ = self.flush();
        let _ = self.socket().shutdown(Shutdown::Write);
    }

    fn abort(&mut self) {
        let _ = self.socket().shutdown(Shutdown::Both);
    }

    /// Ends the connection after an answer sent before the request was read in full: without
    /// draining what the client still sends, closing would reset the connection and the client
    /// could lose the answer. Bounded in time.
    fn finish_unread(&mut self) {
        self.finish();
        let sock = self.socket();
        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
        let (mut chunk, deadline) = ([0; 64 * 1024], Instant::now() + Duration::from_secs(2));
        while Instant::now() < deadline && matches!(sock.read(&mut chunk), Ok(n) if n > 0) {}
    }
}

impl Conn for TcpStream {
    fn socket(&mut self) -> &mut TcpStream {
        self
    }
}

impl Conn for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }
    fn close_notify(&mut self) {
        self.conn.send_close_notify();
    }
}

#[derive(Default)]
struct Head {
    method: String,
    target: String,
    content_length: usize,
    chunked: bool,
    close: bool,
    expect_continue: bool,
    authorization: Option<String>,
    content_type: Option<String>,
}

/// Parses a request head (without the final CRLF CRLF); None if malformed.
fn parse_head(raw: &[u8]) -> Option<Head> {
    let mut lines = std::str::from_utf8(raw).ok()?.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return None;
    }
    let (method, target) = (method.to_string(), target.to_string());
    let mut head = Head {
        method,
        target,
        close: version == "HTTP/1.0",
        ..Head::default()
    };
    let mut length: Option<usize> = None;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return None; // also rejects obsolete line folding
        }
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n = value.parse().ok()?;
                if length.replace(n).is_some_and(|l| l != n) {
                    return None;
                }
            }
            "transfer-encoding" => head.chunked = true,
            "connection" => {
                for token in value.split(',').map(|t| t.trim().to_ascii_lowercase()) {
                    head.close = token == "close" || (head.close && token != "keep-alive");
                }
            }
            "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            "authorization" => head.authorization = Some(value.to_string()),
            "content-type" => head.content_type = Some(value.to_ascii_lowercase()),
            _ => {}
        }
    }
    head.content_length = length.unwrap_or(0);
    Some(head)
}

/// Reads until `buf` holds a whole request head; its length with the CRLF CRLF, None on a
/// clean end of the connection between requests; Err(true) when the head is too large.
fn read_head(s: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<usize>, bool> {
    let mut scanned = 0;
    loop {
        if let Some(i) = buf[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
            let len = scanned + i + 4;
            return if len > MAX_HEAD {
                Err(true)
            } else {
                Ok(Some(len))
            };
        }
        scanned = buf.len().saturating_sub(3);
        if buf.len() > MAX_HEAD {
            return Err(true);
        }
        let mut chunk = [0; 16 * 1024];
        match s.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err(false),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Answers an unreadable request and ends the connection.
fn reject(s: &mut impl Conn, code: u16, message: &str) {
    let _ = respond(s, status(code, message, Value::Null), true);
    s.finish_unread();
}

fn serve(sh: &Shared, conn: u64, mut s: impl Conn) {
    let mut buf = Vec::new();
    loop {
        let len = match read_head(&mut s, &mut buf) {
            Ok(Some(len)) => len,
            Ok(None) | Err(false) => return,
            Err(true) => return reject(&mut s, 431, "request headers too large"),
        };
        let head = parse_head(&buf[..len - 4]);
        buf.drain(..len);
        let Some(head) = head else {
            return reject(&mut s, 400, "malformed HTTP request");
        };
        // ureq sends byte and JSON bodies with Content-Length; refusing chunked bodies keeps a
        // client that streams them from passing here and failing elsewhere.
        if head.chunked || head.content_length > MAX_BODY {
            let code = if head.chunked { 411 } else { 413 };
            record(sh, &head, Vec::new(), conn, code);
            return reject(&mut s, code, describe(code).2);
        }
        if head.expect_continue && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        while buf.len() < head.content_length {
            let mut chunk = [0; 64 * 1024];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head.content_length).collect();

        let index = record(sh, &head, body.clone(), conn, 0);
        let line = format!("{} {}", head.method, head.target);
        let fault = {
            let mut st = lock(&sh.state);
            let i = st
                .faults
                .iter()
                .position(|(p, _)| line.contains(p.as_str()));
            i.map(|i| st.faults.remove(i).1)
        };
        let (code, out) = match fault {
            Some(Fault::Close) => return s.abort(),
            Some(Fault::Hang(d)) => {
                let deadline = Instant::now() + d;
                while Instant::now() < deadline && !sh.stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(10));
                }
                return s.abort();
            }
            Some(Fault::Delay(d)) => {
                let deadline = Instant::now() + d;
                while Instant::now() < deadline && !sh.stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(10));
                }
                to_bytes(handle(&mut lock(&sh.state), &head, &body))
            }
            Some(Fault::Oversized(n)) => (200, oversized(n)),
            Some(Fault::Status(code)) => to_bytes(fault_status(code)),
            None => to_bytes(handle(&mut lock(&sh.state), &head, &body)),
        };
        lock(&sh.state).requests[index].status = code;
        if respond_bytes(&mut s, code, &out, head.close).is_err() || head.close {
            return s.finish();
        }
    }
}

/// Logs a request; its index in the log.
fn record(sh: &Shared, head: &Head, body: Vec<u8>, conn: u64, status: u16) -> usize {
    let mut st = lock(&sh.state);
    let (method, path) = (head.method.clone(), head.target.clone());
    let authorization = head.authorization.clone();
    st.requests.push(Request {
        method,
        path,
        authorization,
        body,
        status,
        conn,
    });
    st.requests.len() - 1
}

fn to_bytes((code, v): Reply) -> (u16, Vec<u8>) {
    (code, serde_json::to_vec(&v).expect("JSON"))
}

fn respond(s: &mut impl Write, reply: Reply, close: bool) -> io::Result<()> {
    let (code, body) = to_bytes(reply);
    respond_bytes(s, code, &body, close)
}

fn respond_bytes(s: &mut impl Write, code: u16, body: &[u8], close: bool) -> io::Result<()> {
    let (phrase, len) = (describe(code).0, body.len());
    let mut head = format!(
        "HTTP/1.1 {code} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n"
    );
    if code == 429 || code == 503 {
        head.push_str("Retry-After: 1\r\n"); // as kube-apiserver's priority and fairness does
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// Per status code: the reason phrase, kube-apiserver's `reason`, and its usual message (413's
/// limit is MAX_BODY).
const CODES: &str = "\
200|OK||
201|Created||
400|Bad Request|BadRequest|the server rejected our request
401|Unauthorized|Unauthorized|Unauthorized
403|Forbidden|Forbidden|forbidden
404|Not Found|NotFound|the server could not find the requested resource
405|Method Not Allowed|MethodNotAllowed|the server does not allow this method on the requested resource
409|Conflict|Conflict|Operation cannot be fulfilled: the object has been modified
410|Gone|Expired|too old resource version
411|Length Required|LengthRequired|chunked request bodies are not supported
413|Payload Too Large|RequestEntityTooLarge|Request entity too large: limit is 8388608
415|Unsupported Media Type|UnsupportedMediaType|the body of the request was in an unknown format
422|Unprocessable Entity|Invalid|the object is invalid
429|Too Many Requests|TooManyRequests|Too many requests, please try again later.
500|Internal Server Error|InternalError|Internal error occurred: fake fault
503|Service Unavailable|ServiceUnavailable|the server is currently unable to handle the request
504|Gateway Timeout|Timeout|the server was unable to return a response in the time allotted";

fn describe(code: u16) -> (&'static str, &'static str, &'static str) {
    let key = format!("{code}|");
    let line = CODES.lines().find(|l| l.starts_with(&key));
    let mut parts = line.unwrap_or("0|Unknown||fake fault").split('|').skip(1);
    let mut next = || parts.next().unwrap_or("");
    (next(), next(), next())
}

/// A failure `Status` as kube-apiserver sends it; `details` left out when null.
fn status(code: u16, message: &str, details: Value) -> Reply {
    let (reason, md) = (describe(code).1, json!({}));
    let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": md, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    if !details.is_null() {
        v["details"] = details;
    }
    (code, v)
}

fn bad_request(message: &str) -> Reply {
    status(400, message, Value::Null)
}

fn fault_status(code: u16) -> Reply {
    let details = match code {
        429 | 503 => json!({"retryAfterSeconds": 1}),
        500 => json!({"causes": [{"message": "fake fault"}]}),
        _ => Value::Null,
    };
    status(code, describe(code).2, details)
}

/// A 200 answer of exactly `n` bytes: a claim padded with a huge annotation.
fn oversized(n: usize) -> Vec<u8> {
    let make = |pad: usize| {
        let meta = r#""name":"oversized","namespace":"default""#;
        let x = "x".repeat(pad);
        format!(
            r#"{{"kind":"ResourceClaim","apiVersion":"{RESOURCE_V1}","metadata":{{{meta},"annotations":{{"pad":"{x}"}}}}}}"#
        )
    };
    make(n.saturating_sub(make(0).len())).into_bytes()
}

fn found(v: Option<&Value>, kind: &str, group: Option<&str>, name: &str) -> Result<Reply, Reply> {
    if let Some(v) = v {
        return Ok((200, v.clone()));
    }
    let qualified = group.map_or(kind.to_string(), |g| format!("{kind}.{g}"));
    let mut details = json!({"name": name, "kind": kind});
    if let Some(g) = group {
        details["group"] = json!(g);
    }
    Err(status(
        404,
        &format!("{qualified} \"{name}\" not found"),
        details,
    ))
}

fn slice_details(name: &str) -> Value {
    json!({"name": name, "group": GROUP, "kind": "resourceslices"})
}

fn conflict(name: &str, why: &str) -> Reply {
    let msg = format!("Operation cannot be fulfilled on resourceslices.{GROUP} \"{name}\": {why}");
    status(409, &msg, slice_details(name))
}

/// A field of an object by dotted path, as a field selector sees it ("" when absent).
fn field(obj: &Value, path: &str) -> String {
    match path.split('.').fold(obj, |v, k| &v[k]) {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let (b, mut out, mut i) = (s.as_bytes(), Vec::new(), 0);
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        let (byte, step) = match (b[i], hex) {
            (b'%', Some(x)) => (x, 3),
            (b'+', _) => (b' ', 1),
            (c, _) => (c, 1),
        };
        out.push(byte);
        i += step;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `fieldSelector` as (field, value, negated) terms; fields are those kube-apiserver
/// supports for ResourceSlices, anything else is its 400.
type Selector = Vec<(String, String, bool)>;

fn field_selector(query: &str) -> Result<Selector, Reply> {
    let mut terms = Vec::new();
    let params = query.split('&').filter_map(|kv| kv.split_once('='));
    for (_, v) in params.filter(|(k, _)| percent_decode(k) == "fieldSelector") {
        for term in percent_decode(v).split(',').filter(|t| !t.is_empty()) {
            let (f, val, neg) = match term.split_once("!=") {
                Some((f, val)) => (f, val, true),
                None => match term.split_once("==").or_else(|| term.split_once('=')) {
                    Some((f, val)) => (f, val, false),
                    None => return Err(bad_request(&format!("invalid selector: {term}"))),
                },
            };
            let f = f.trim();
            if !["spec.nodeName", "spec.driver", "metadata.name"].contains(&f) {
                return Err(bad_request(&format!("field label not supported: {f}")));
            }
            terms.push((f.to_string(), val.trim().to_string(), neg));
        }
    }
    Ok(terms)
}

fn matches(slice: &Value, sel: &Selector) -> bool {
    sel.iter()
        .all(|(f, v, neg)| (field(slice, f) == *v) != *neg)
}

/// A list's items: stored objects without kind/apiVersion, as kube-apiserver sends them.
fn list(rv: u64, items: Vec<Value>) -> Reply {
    let mut items = items;
    for o in items.iter_mut().filter_map(Value::as_object_mut) {
        o.remove("kind");
        o.remove("apiVersion");
    }
    let meta = json!({"resourceVersion": rv.to_string()});
    (
        200,
        json!({"kind": "ResourceSliceList", "apiVersion": RESOURCE_V1, "metadata": meta, "items": items}),
    )
}

fn handle(st: &mut State, head: &Head, body: &[u8]) -> Reply {
    let auth = head
        .authorization
        .as_deref()
        .and_then(|a| a.split_once(' '));
    let token = auth
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    if st.token.is_empty() || token != Some(st.token.as_str()) {
        return status(401, "Unauthorized", Value::Null);
    }
    route(st, head, body).unwrap_or_else(|e| e)
}

fn route(st: &mut State, head: &Head, body: &[u8]) -> Result<Reply, Reply> {
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = head.method.as_str();
    match (method, segs.as_slice()) {
        ("GET", ["api", "v1", "nodes", name]) => found(st.nodes.get(*name), "nodes", None, name),
        ("GET", ["apis", GROUP, "v1", "namespaces", ns, "resourceclaims", name]) => {
            let claim = st.claims.get(&(ns.to_string(), name.to_string()));
            found(claim, "resourceclaims", Some(GROUP), name)
        }
        ("GET" | "POST" | "DELETE", ["apis", GROUP, "v1", "resourceslices"]) => {
            let sel = field_selector(query)?;
            let picked = st.slices.iter().filter(|(_, s)| matches(s, &sel));
            match method {
                "GET" => Ok(list(st.rv, picked.map(|(_, s)| s.clone()).collect())),
                "POST" => create(st, body),
                _ => {
                    let names: Vec<String> = picked.map(|(n, _)| n.clone()).collect();
                    let gone = names.iter().filter_map(|n| st.slices.remove(n)).collect();
                    st.next_rv();
                    Ok(list(st.rv, gone))
                }
            }
        }
        ("GET", ["apis", GROUP, "v1", "resourceslices", name]) => {
            found(st.slices.get(*name), "resourceslices", Some(GROUP), name)
        }
        ("PUT", ["apis", GROUP, "v1", "resourceslices", name]) => update(st, name, body),
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            create_event(st, ns, body)
        }
        ("GET", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            let items = st.events.iter().filter(|((n, _), _)| n == ns);
            Ok(list(st.rv, items.map(|(_, e)| e.clone()).collect()))
        }
        ("PATCH", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", name]) => {
            patch_event(st, ns, name, head, body)
        }
        ("DELETE", ["apis", GROUP, "v1", "resourceslices", name]) => delete(st, name, body),
        (_, ["api", "v1", "nodes", _])
        | (_, ["apis", GROUP, "v1", "namespaces", _, "resourceclaims", _])
        | (_, ["apis", GROUP, "v1", "resourceslices", ..]) => {
            Err(status(405, describe(405).2, Value::Null))
        }
        _ => Err(status(404, describe(404).2, json!({}))),
    }
}

/// kube-apiserver's `ValidateEventCreate` for `events.k8s.io/v1` (pkg/apis/core/validation/
/// events.go): eventTime, type, reportingController (a qualified name), reportingInstance,
/// action and reason within 128, note within 1 KiB, series count at least 2 with a
/// lastObservedTime, and a cluster-scoped object's Events in `default` or `kube-system`.
fn validate_event(ns: &str, e: &Value) -> Result<(), Reply> {
    let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
    let mut bad = Vec::new();
    if text("eventTime").is_empty() {
        bad.push("eventTime: Required value".to_string());
    }
    if !matches!(text("type"), "Normal" | "Warning") {
        bad.push(format!("type: Invalid value: {:?}", text("type")));
    }
    let rc = text("reportingController");
    let qualified = rc.rsplit('/').next().is_some_and(|n| {
        !n.is_empty()
            && n.len() <= 63
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    });
    if rc.is_empty() || !qualified {
        bad.push(format!("reportingController: Invalid value: {rc:?}"));
    }
    let ri = text("reportingInstance");
    if ri.is_empty() || ri.len() > 128 {
        bad.push("reportingInstance: Required value".into());
    }
    for k in ["action", "reason"] {
        if text(k).is_empty() || text(k).len() > 128 {
            bad.push(format!("{k}: Invalid value"));
        }
    }
    if text("note").len() > 1024 {
        bad.push("note: Too long".into());
    }
    if let Some(series) = e.get("series") {
        if series.get("count").and_then(Value::as_u64).unwrap_or(0) < 2 {
            bad.push("series.count: should be at least 2".into());
        }
        if series
            .get("lastObservedTime")
            .and_then(Value::as_str)
            .is_none()
        {
            bad.push("series.lastObservedTime: Required value".into());
        }
    }
    let regarding_ns = e["regarding"]["namespace"].as_str().unwrap_or("");
    if regarding_ns.is_empty() && !matches!(ns, "default" | "kube-system") {
        bad.push("involvedObject.namespace: does not match event.namespace".into());
    }
    if bad.is_empty() {
        return Ok(());
    }
    Err(status(
        422,
        &format!("Event is invalid: {}", bad.join(", ")),
        Value::Null,
    ))
}

fn create_event(st: &mut State, ns: &str, body: &[u8]) -> Result<Reply, Reply> {
    let mut e: Value =
        serde_json::from_slice(body).map_err(|e| bad_request(&format!("json parse error: {e}")))?;
    let name = e["metadata"]["name"].as_str().unwrap_or("").to_string();
    if name.is_empty() || name.len() > 253 {
        return Err(status(422, "metadata.name: Invalid value", Value::Null));
    }
    validate_event(ns, &e)?;
    let key = (ns.to_string(), name.clone());
    if st.events.contains_key(&key) {
        let msg = format!("events.events.k8s.io \"{name}\" already exists");
        return Err(status(409, &msg, json!({"name": name, "kind": "events"})));
    }
    let rv = st.next_rv();
    e["metadata"]["resourceVersion"] = json!(rv);
    e["metadata"]["namespace"] = json!(ns);
    st.events.insert(key, e.clone());
    Ok((201, e))
}

/// A JSON merge patch (RFC 7386) of an Event; the fields `ValidateEventUpdate` keeps
/// immutable must not change.
fn patch_event(
    st: &mut State,
    ns: &str,
    name: &str,
    head: &Head,
    body: &[u8],
) -> Result<Reply, Reply> {
    let kind = head.content_type.as_deref().unwrap_or("");
    if !kind.starts_with("application/merge-patch+json")
        && !kind.starts_with("application/strategic-merge-patch+json")
    {
        return Err(status(
            415,
            "the body of the request was in an unknown format",
            Value::Null,
        ));
    }
    let patch: Value =
        serde_json::from_slice(body).map_err(|e| bad_request(&format!("json parse error: {e}")))?;
    let key = (ns.to_string(), name.to_string());
    let Some(old) = st.events.get(&key).cloned() else {
        return found(None, "events", Some("events.k8s.io"), name);
    };
    let mut new = old.clone();
    merge(&mut new, &patch);
    for k in [
        "reason",
        "note",
        "type",
        "action",
        "regarding",
        "reportingController",
        "reportingInstance",
        "eventTime",
    ] {
        if new.get(k) != old.get(k) {
            return Err(status(
                422,
                &format!("Event is invalid: {k}: field is immutable"),
                Value::Null,
            ));
        }
    }
    validate_event(ns, &new)?;
    let rv = st.next_rv();
    new["metadata"]["resourceVersion"] = json!(rv);
    st.events.insert(key, new.clone());
    Ok((200, new))
}

/// RFC 7386: objects merge, null deletes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// The request body as a ResourceSlice object, or kube-apiserver's 400.
fn slice_body(body: &[u8]) -> Result<Value, Reply> {
    let parsed = serde_json::from_slice::<Value>(body);
    let mut v = parsed.map_err(|e| bad_request(&format!("json parse error: {e}")))?;
    let o = v
        .as_object_mut()
        .ok_or_else(|| bad_request("the body is not an object"))?;
    // The fake stores v1 only: no conversion from other versions.
    for (k, want) in [("kind", "ResourceSlice"), ("apiVersion", RESOURCE_V1)] {
        match o.get(k).and_then(Value::as_str) {
            None => drop(o.insert(k.into(), json!(want))),
            Some(got) if got == want => {}
            Some(got) => return Err(bad_request(&format!("{k} {got:?} is not {want:?}"))),
        }
    }
    if !o.get("metadata").is_some_and(Value::is_object) {
        o.insert("metadata".into(), json!({}));
    }
    Ok(v)
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| ok(c) || *c == b'-')
        && ok(&b[0])
        && ok(&b[b.len() - 1])
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

const LABEL_RULE: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric \
    characters or '-', and must start and end with an alphanumeric character";
const SELECTION_RULE: &str =
    "exactly one of `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection` is required";

/// kube-apiserver's ResourceSlice validation, the parts a driver can get wrong.
fn validate(slice: &Value, name: &str) -> Result<(), Reply> {
    let mut causes: Vec<Value> = Vec::new();
    let mut add = |field: &str, reason: &str, message: String| {
        causes.push(json!({"field": field, "reason": reason, "message": message}));
    };
    let required = "FieldValueRequired";
    let spec = &slice["spec"];
    let driver = field(slice, "spec.driver");
    if driver.is_empty() {
        add("spec.driver", required, "Required value".into());
    } else if driver.len() > 63 || !is_dns_subdomain(&driver) {
        let why =
            format!("Invalid value: {driver:?}: must be a DNS subdomain of at most 63 characters");
        add("spec.driver", "FieldValueInvalid", why);
    }
    if field(slice, "spec.pool.name").is_empty() {
        add("spec.pool.name", required, "Required value".into());
    }
    if spec["pool"]["resourceSliceCount"].as_i64().unwrap_or(0) <= 0 {
        add(
            "spec.pool.resourceSliceCount",
            required,
            "Required value".into(),
        );
    }
    if !is_dns_subdomain(name) {
        let why = format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain is required");
        add("metadata.name", "FieldValueInvalid", why);
    }
    let selections = [
        spec["nodeName"].as_str().is_some_and(|n| !n.is_empty()),
        !spec["nodeSelector"].is_null(),
        spec["allNodes"] == json!(true),
        spec["perDeviceNodeSelection"] == json!(true),
    ];
    if selections.iter().filter(|s| **s).count() != 1 {
        add(
            "spec",
            required,
            format!("Required value: {SELECTION_RULE}"),
        );
    }
    let devices = spec["devices"].as_array().map_or(&[][..], Vec::as_slice);
    if devices.len() > MAX_DEVICES {
        let why = format!(
            "Too many: {}: must have at most {MAX_DEVICES} items",
            devices.len()
        );
        add("spec.devices", "FieldValueTooMany", why);
    }
    let mut seen = HashSet::new();
    for (i, d) in devices.iter().enumerate() {
        let (dname, f) = (field(d, "name"), format!("spec.devices[{i}].name"));
        if !is_dns_label(&dname) {
            add(
                &f,
                "FieldValueInvalid",
                format!("Invalid value: {dname:?}: {LABEL_RULE}"),
            );
        } else if !seen.insert(dname.clone()) {
            add(
                &f,
                "FieldValueDuplicate",
                format!("Duplicate value: {dname:?}"),
            );
        }
    }
    invalid(name, causes)
}

/// kube-apiserver's 422 for these causes, if any.
fn invalid(name: &str, causes: Vec<Value>) -> Result<(), Reply> {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", field(c, "field"), field(c, "message")))
        .collect();
    let joined = match parts.len() {
        0 => return Ok(()),
        1 => parts[0].clone(),
        _ => format!("[{}]", parts.join(", ")),
    };
    let msg = format!("ResourceSlice.{GROUP} \"{name}\" is invalid: {joined}");
    let details = json!({"name": name, "group": GROUP, "kind": "ResourceSlice", "causes": causes});
    Err(status(422, &msg, details))
}

fn create(st: &mut State, body: &[u8]) -> Result<Reply, Reply> {
    let mut slice = slice_body(body)?;
    let mut name = field(&slice, "metadata.name");
    let generate = field(&slice, "metadata.generateName");
    if name.is_empty() && !generate.is_empty() {
        name = format!("{generate}{}", st.rand_string(5, NAME_CHARS));
    }
    if name.is_empty() {
        let why = "Required value: name or generateName is required";
        invalid(
            "",
            vec![json!({"field": "metadata.name", "reason": "FieldValueRequired", "message": why})],
        )?;
    }
    validate(&slice, &name)?;
    if st.slices.contains_key(&name) {
        let msg = format!("resourceslices.{GROUP} \"{name}\" already exists");
        let (code, mut v) = status(409, &msg, slice_details(&name));
        v["reason"] = json!("AlreadyExists");
        return Err((code, v));
    }
    let (uid, rv, now) = (st.uid(), st.next_rv(), now_rfc3339());
    let meta = &mut slice["metadata"];
    meta["name"] = json!(name);
    meta["uid"] = json!(uid);
    meta["resourceVersion"] = json!(rv);
    meta["generation"] = json!(1);
    meta["creationTimestamp"] = json!(now);
    st.slices.insert(name, slice.clone());
    Ok((201, slice))
}

fn update(st: &mut State, name: &str, body: &[u8]) -> Result<Reply, Reply> {
    let old = found(st.slices.get(name), "resourceslices", Some(GROUP), name)?.1;
    let mut slice = slice_body(body)?;
    let body_name = field(&slice, "metadata.name");
    if body_name != name {
        let msg = format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        );
        return Err(bad_request(&msg));
    }
    // Optimistic concurrency; an update without a resourceVersion is unconditional, which
    // kube-apiserver allows for ResourceSlices.
    let rv = field(&slice, "metadata.resourceVersion");
    if !rv.is_empty() && rv != field(&old, "metadata.resourceVersion") {
        let why = "the object has been modified; please apply your changes to the latest version and try again";
        return Err(conflict(name, why));
    }
    validate(&slice, name)?;
    let spec_changed = i64::from(old["spec"] != slice["spec"]);
    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + spec_changed;
    let new_rv = st.next_rv();
    let meta = &mut slice["metadata"];
    meta["uid"] = old["metadata"]["uid"].clone();
    meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
    meta["generation"] = json!(generation);
    meta["resourceVersion"] = json!(new_rv);
    st.slices.insert(name.to_string(), slice.clone());
    Ok((200, slice))
}

/// Deletes one slice, honouring DeleteOptions' preconditions; answers a Status Success, as
/// kube-apiserver does for ResourceSlices.
fn delete(st: &mut State, name: &str, body: &[u8]) -> Result<Reply, Reply> {
    let old = found(st.slices.get(name), "resourceslices", Some(GROUP), name)?.1;
    let options: Value = match body {
        [] => Value::Null,
        _ => serde_json::from_slice(body)
            .map_err(|e| bad_request(&format!("json parse error: {e}")))?,
    };
    for (pre, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        let want = field(&options, &format!("preconditions.{pre}"));
        let have = field(&old, &format!("metadata.{pre}"));
        if !want.is_empty() && want != have {
            let why = format!("Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}");
            return Err(conflict(name, &why));
        }
    }
    st.slices.remove(name);
    st.next_rv();
    let mut details = slice_details(name);
    details["uid"] = old["metadata"]["uid"].clone();
    Ok((
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
    ))
}

/// Now as RFC 3339 in UTC, seconds precision (metav1.Time's format).
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}
