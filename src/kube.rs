//! A small synchronous client of the Kubernetes API server: JSON over HTTPS (ureq, rustls with
//! the cluster CA as the only root), a bearer token re-read from its file every minute and on
//! a 401 (the kubelet rewrites a projected token before it expires, as client-go expects), and
//! bounded in time and size so that a hung or hostile API server costs a caller one timeout.
//! Cloned freely: the main loop and the prepare threads share one connection pool and token.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::serde::de::DeserializeOwned;
use k8s_openapi::serde::Serialize;
use log::{debug, info, warn};

use crate::config::DraConfig;

/// One request's deadline, connection included: well inside the kubelet's 45 s for a prepare.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer we read (a claim or a slice list is a few KiB to a few hundred).
pub const MAX_BODY: u64 = 4 << 20;
/// A request refused with 401 is sent again with the token read afresh if the refusal came
/// within this (so a call costs at most about one [`REQUEST_TIMEOUT`]).
const RETRY_401_WITHIN: Duration = Duration::from_secs(2);
/// The token file is read again after this long (client-go's period).
const TOKEN_REFRESH: Duration = Duration::from_secs(60);
/// The largest token file we read.
const MAX_TOKEN: u64 = 64 << 10;

#[derive(Debug)]
pub enum Error {
    /// The configuration cannot work (no API address, an unreadable CA).
    Setup(String),
    /// No answer: connection refused, TLS failure, timeout.
    Transport(String),
    /// The API server answered with an error status.
    Status {
        code: u16,
        reason: String,
        message: String,
    },
    /// An answer we cannot read (not the JSON we asked for, or too large).
    Decode(String),
}

impl Error {
    /// The HTTP status of an answered request.
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Setup(why) => write!(f, "API client: {why}"),
            Error::Transport(why) => write!(f, "API server unreachable: {why}"),
            Error::Status {
                code,
                reason,
                message,
            } => write!(f, "API server answered {code} {reason}: {message}"),
            Error::Decode(why) => write!(f, "unreadable answer from the API server: {why}"),
        }
    }
}

impl std::error::Error for Error {}

struct Token {
    value: Option<String>,
    read_at: Option<Instant>,
}

/// A client of one API server.
#[derive(Clone)]
pub struct Kube {
    base: String,
    agent: ureq::Agent,
    token_file: PathBuf,
    token: Arc<Mutex<Token>>,
}

impl fmt::Debug for Kube {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kube({})", self.base)
    }
}

/// Reads a credential file: symlinks followed (the kubelet's projected service-account volume
/// makes `token` and `ca.crt` links into a `..data` directory it swaps atomically), a regular
/// file at the end, bounded.
pub fn read_credential(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    crate::resource::cdi::read_regular(path, max, true)
}

/// The API server's address: `--kube-api`, else the in-cluster service env.
pub fn api_url(cfg: &DraConfig) -> Result<String, Error> {
    if let Some(url) = &cfg.kube_api {
        return Ok(url.clone());
    }
    let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
        Error::Setup(
            "KUBERNETES_SERVICE_HOST is not set (not in a pod?): pass --kube-api".to_string(),
        )
    })?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_string());
    // An IPv6 service address needs brackets in a URL.
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(format!("https://{host}:{port}"))
}

impl Kube {
    /// A client from the flags and the in-cluster defaults. HTTPS trusts the CA file alone.
    pub fn new(cfg: &DraConfig) -> Result<Kube, Error> {
        let base = api_url(cfg)?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The in-cluster service address is never reached through a proxy.
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .user_agent(concat!("jarvice-rdma-plugin/", env!("CARGO_PKG_VERSION")));
        if base.starts_with("https://") {
            let pem = read_credential(&cfg.ca_file, 1 << 20).map_err(|e| {
                Error::Setup(format!("cannot read the CA {}: {e}", cfg.ca_file.display()))
            })?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(Error::Setup(format!(
                    "{} holds no PEM certificate",
                    cfg.ca_file.display()
                )));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .provider(ureq::tls::TlsProvider::Rustls)
                    .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
                    .unversioned_rustls_crypto_provider(provider)
                    .build(),
            );
        }
        Ok(Kube {
            base,
            agent: config.build().new_agent(),
            token_file: cfg.token_file.clone(),
            token: Arc::new(Mutex::new(Token {
                value: None,
                read_at: None,
            })),
        })
    }

    /// Where it sends requests.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The token, read again when a minute old or when `force`d (after a 401). A missing file
    /// means no token (an API server reached without one answers 401, which says why).
    fn token(&self, force: bool) -> Option<String> {
        let mut t = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        let due = t.read_at.is_none_or(|at| at.elapsed() >= TOKEN_REFRESH);
        if force || due {
            match read_credential(&self.token_file, MAX_TOKEN) {
                Ok(bytes) => {
                    let v = String::from_utf8_lossy(&bytes).trim().to_string();
                    if t.value.as_deref() != Some(v.as_str()) && t.value.is_some() {
                        info!("service-account token changed: using the new one");
                    }
                    t.value = (!v.is_empty()).then_some(v);
                }
                Err(e) => {
                    if t.value.is_some() || t.read_at.is_none() {
                        warn!("cannot read the token {}: {e}", self.token_file.display());
                    }
                    t.value = None;
                }
            }
            t.read_at = Some(Instant::now());
        }
        t.value.clone()
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call("GET", path, None)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        self.call("POST", path, Some(encode(body)?))
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, Error> {
        self.call("PUT", path, Some(encode(body)?))
    }

    /// A JSON merge patch (RFC 7386): the fields in `body` replace the object's.
    pub fn merge_patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        self.call("PATCH", path, Some(encode(body)?))
    }

    pub fn delete(&self, path: &str) -> Result<(), Error> {
        self.call::<serde_json::Value>("DELETE", path, None)
            .map(|_| ())
    }

    /// One request, sent again once with a freshly read token after a 401.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, Error> {
        let start = Instant::now();
        match self.send(method, path, body.as_deref(), false) {
            // Once, and only after a prompt 401: a caller's time is bounded by one request.
            Err(Error::Status { code: 401, .. }) if start.elapsed() < RETRY_401_WITHIN => {
                debug!("401 from the API server: reading the token again");
                self.send(method, path, body.as_deref(), true)
            }
            other => other,
        }
    }

    fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        fresh_token: bool,
    ) -> Result<T, Error> {
        let url = format!("{}{path}", self.base);
        let token = self.token(fresh_token);
        let mut builder = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Accept", "application/json");
        if let Some(t) = &token {
            builder = builder.header("Authorization", format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => {
                let kind = if method == "PATCH" {
                    "application/merge-patch+json"
                } else {
                    "application/json"
                };
                let req = builder
                    .header("Content-Type", kind)
                    .body(b.to_vec())
                    .map_err(|e| Error::Setup(format!("bad request {method} {path}: {e}")))?;
                self.agent.run(req)
            }
            None => {
                let req = builder
                    .body(())
                    .map_err(|e| Error::Setup(format!("bad request {method} {path}: {e}")))?;
                self.agent.run(req)
            }
        };
        let mut resp = result.map_err(|e| Error::Transport(format!("{method} {path}: {e}")))?;
        let code = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| Error::Decode(format!("{method} {path}: {e}")))?;
        if !(200..300).contains(&code) {
            return Err(status_error(code, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(format!("{method} {path}: {e}")))
    }
}

fn encode<B: Serialize>(body: &B) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(body).map_err(|e| Error::Setup(format!("cannot encode a request: {e}")))
}

/// The error of a non-2xx answer, from its `Status` body when there is one.
fn status_error(code: u16, body: &[u8]) -> Error {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let text = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(|s| s.chars().take(300).collect::<String>())
    };
    Error::Status {
        code,
        reason: text("reason").unwrap_or_default(),
        message: text("message")
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()),
    }
}

/// A path segment or query value, percent-encoded (RFC 3986 unreserved characters kept).
pub fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
