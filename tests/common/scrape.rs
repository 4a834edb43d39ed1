//! Scraping the plugin's `/metrics` as Prometheus does: over TCP, parsed by a Prometheus
//! text-format parser (`prometheus-parse`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use prometheus_parse::{Sample, Scrape, Value};

use super::{wait_for, Plugin, WAIT};

/// The address the plugin's log says it serves metrics on (it binds port 0: the kernel picks).
pub fn metrics_addr(plugin: &Plugin) -> SocketAddr {
    assert!(
        plugin.wait_log("metrics on http://"),
        "{}",
        plugin.log_text()
    );
    let log = plugin.log_text();
    let at = log.split("metrics on http://").nth(1).unwrap();
    at.split('/').next().unwrap().parse().unwrap()
}

/// One HTTP exchange: the status line and the body.
pub fn http(addr: SocketAddr, request: &str) -> (String, String) {
    try_http(addr, request).unwrap_or_else(|e| panic!("{request:?}: {e}"))
}

/// One HTTP exchange, or why it failed (a connection turned away while the endpoint is busy
/// may be reset: the server closes it with the request unread).
pub fn try_http(addr: SocketAddr, request: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(WAIT))?;
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// A scrape as Prometheus makes it, parsed.
pub fn scrape(addr: SocketAddr) -> Scrape {
    try_scrape(addr).unwrap_or_else(|why| panic!("scrape: {why}"))
}

pub fn try_scrape(addr: SocketAddr) -> Result<Scrape, String> {
    let (status, body) = try_http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain;version=0.0.4\r\n\r\n",
    )
    .map_err(|e| e.to_string())?;
    if status != "HTTP/1.1 200 OK" {
        return Err(format!("{status}: {body}"));
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).map_err(|e| e.to_string())
}

/// The value of the sample `name` whose labels include `labels`.
pub fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x: &&Sample| {
            x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
        })
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

/// Scrapes until `cond` holds (the plugin reads ports every 100 ms in these tests).
pub fn scrape_until(addr: SocketAddr, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    let ok = wait_for(WAIT, || {
        let Ok(s) = try_scrape(addr) else {
            return false;
        };
        let done = cond(&s);
        last = Some(s);
        done
    });
    assert!(ok, "{what}: last scrape {:#?}", last.map(|s| s.samples));
    last.unwrap()
}
