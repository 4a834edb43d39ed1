//! The fake API server (tests/common/fake_api.rs) against the client the DRA front-end uses
//! (ureq 3 + rustls on `ring`, keep-alive pooling, bearer token, JSON with Content-Length), so a
//! failing DRA test points at the product, not at a fake that speaks something else.
#![cfg(feature = "dra")]

#[path = "common/fake_api.rs"]
mod fake_api;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_api::{FakeApi, Fault};
use serde_json::{json, Value};
use ureq::config::ConfigBuilder;
use ureq::typestate::AgentScope;

/// Upper bound of every wait; generous for a loaded 2-core machine or qemu-user.
const WAIT: Duration = Duration::from_secs(20);
const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

/// A temp dir of the test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fakeapi-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's temp dir");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client built as the product builds its own, with the fake's token file.
struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

type Tweak = fn(ConfigBuilder<AgentScope>) -> ConfigBuilder<AgentScope>;

fn client(api: &FakeApi) -> Client {
    client_with(api, api.ca_file().as_deref(), |b| b)
}

fn client_with(api: &FakeApi, ca: Option<&Path>, tweak: Tweak) -> Client {
    let certs: Vec<_> = match ca {
        Some(ca) => ureq::tls::parse_pem(&std::fs::read(ca).expect("read CA file"))
            .filter_map(|item| match item.expect("PEM item") {
                ureq::tls::PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .tls_config(tls);
    let token = std::fs::read_to_string(api.token_file()).expect("read token file");
    Client {
        agent: tweak(config).build().new_agent(),
        base: api.url(),
        token,
    }
}

impl Client {
    /// One request as the product sends it (`Agent::run`): bearer token, JSON with
    /// Content-Length.
    fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let ct = "application/json";
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Accept", ct)
            .header("Authorization", &auth);
        match body.map(|b| serde_json::to_vec(b).expect("serialize body")) {
            // DeleteOptions: ureq sends a DELETE body only when told to.
            Some(b) if method == "DELETE" => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .header("Content-Type", ct)
                .force_send_body()
                .send(&b[..]),
            Some(b) => self
                .agent
                .run(req.header("Content-Type", ct).body(b).expect("request")),
            None => self.agent.run(req.body(()).expect("request")),
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ureq::Error> {
        let mut res = self.raw(method, path, body)?;
        let code = res.status().as_u16();
        let bytes = res.body_mut().read_to_vec()?;
        Ok((
            code,
            serde_json::from_slice(&bytes).expect("the fake answers JSON"),
        ))
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.call(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

fn slice(name: &str, node: &str, driver: &str, devices: usize) -> Value {
    let devices: Vec<Value> = (0..devices)
        .map(|i| json!({"name": format!("dev-{i}")}))
        .collect();
    json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": name},
        "spec": {"driver": driver, "nodeName": node, "devices": devices,
            "pool": {"name": node, "generation": 0, "resourceSliceCount": 1}}})
}

fn names(list: &Value) -> Vec<String> {
    assert_eq!(list["kind"], "ResourceSliceList", "{list}");
    let items = list["items"].as_array().expect("items");
    items
        .iter()
        .map(|i| i["metadata"]["name"].as_str().expect("name").to_string())
        .collect()
}

fn crud(tls: bool) {
    let dir = Dir::new("crud");
    let api = FakeApi::start(tls, &dir.0);
    assert_eq!(api.url().starts_with("https://"), tls, "{}", api.url());
    assert_eq!(api.ca_file().is_some(), tls);
    let c = client(&api);

    let (code, created) = c.ok(
        "POST",
        SLICES,
        Some(&slice("s1", "n1", "rdma.example.com", 2)),
    );
    assert_eq!(code, 201, "{created}");
    let rv1 = created["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .to_string();
    assert!(
        created["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36),
        "{created}"
    );
    assert_eq!(created["metadata"]["generation"], 1);
    let ts = created["metadata"]["creationTimestamp"]
        .as_str()
        .expect("creationTimestamp");
    assert!(
        ts.len() == 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );

    let (code, got) = c.ok("GET", &format!("{SLICES}/s1"), None);
    assert_eq!((code, &got), (200, &created));

    // An update with the current resourceVersion wins and bumps it (and the generation: the
    // spec changed); a second one with the now stale version is kube's 409 Conflict.
    let mut changed = got.clone();
    changed["spec"]["devices"] = json!([{"name": "dev-9"}]);
    let (code, updated) = c.ok("PUT", &format!("{SLICES}/s1"), Some(&changed));
    assert_eq!(code, 200, "{updated}");
    assert_ne!(updated["metadata"]["resourceVersion"], json!(rv1));
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(updated["metadata"]["generation"], 2);
    assert_eq!(updated["spec"]["devices"], json!([{"name": "dev-9"}]));
    let (code, status) = c.ok("PUT", &format!("{SLICES}/s1"), Some(&changed));
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("Conflict")),
        "{status}"
    );
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 409);
    assert_eq!(api.slices(), vec![updated.clone()]);

    let (code, status) = c.ok(
        "POST",
        SLICES,
        Some(&slice("s1", "n1", "rdma.example.com", 1)),
    );
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("AlreadyExists")),
        "{status}"
    );
    let (code, status) = c.ok(
        "PUT",
        &format!("{SLICES}/nope"),
        Some(&slice("nope", "n1", "d.example.com", 1)),
    );
    assert_eq!(
        (code, status["reason"].as_str()),
        (404, Some("NotFound")),
        "{status}"
    );

    let wrong_uid =
        json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "not-it"}});
    let (code, status) = c.ok("DELETE", &format!("{SLICES}/s1"), Some(&wrong_uid));
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("Conflict")),
        "{status}"
    );
    let (code, status) = c.ok("DELETE", &format!("{SLICES}/s1"), None);
    assert_eq!(
        (code, status["status"].as_str()),
        (200, Some("Success")),
        "{status}"
    );
    assert_eq!(status["details"]["uid"], created["metadata"]["uid"]);
    let (code, status) = c.ok("GET", &format!("{SLICES}/s1"), None);
    assert_eq!(
        (code, status["reason"].as_str()),
        (404, Some("NotFound")),
        "{status}"
    );
    assert_eq!(status["details"]["name"], "s1");
    assert_eq!(
        status["message"],
        "resourceslices.resource.k8s.io \"s1\" not found"
    );
    let (code, _) = c.ok("DELETE", &format!("{SLICES}/s1"), None);
    assert_eq!(code, 404);
    assert!(api.slices().is_empty());

    // The log: every request, in order, with the token and the answer.
    let log = api.requests();
    let statuses: Vec<u16> = log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 200, 200, 409, 409, 404, 409, 200, 404, 404]);
    assert!(log
        .iter()
        .all(|r| r.authorization.as_deref() == Some(format!("Bearer {}", c.token).as_str())));
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str()),
        ("POST", SLICES)
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&log[0].body).expect("logged body"),
        slice("s1", "n1", "rdma.example.com", 2)
    );
}

#[test]
fn crud_plain() {
    crud(false);
}

#[test]
fn crud_tls() {
    crud(true);
}

#[test]
fn generate_name() {
    let dir = Dir::new("gen");
    let api = FakeApi::start(false, &dir.0);
    let c = client(&api);
    let mut s = slice("", "n1", "rdma.example.com", 1);
    s["metadata"] = json!({"generateName": "n1-rdma-"});
    let (code, a) = c.ok("POST", SLICES, Some(&s));
    let (code2, b) = c.ok("POST", SLICES, Some(&s));
    assert_eq!((code, code2), (201, 201), "{a} {b}");
    let (a, b) = (
        a["metadata"]["name"].as_str().expect("name"),
        b["metadata"]["name"].as_str().expect("name"),
    );
    for name in [a, b] {
        let suffix = name.strip_prefix("n1-rdma-").expect("generateName prefix");
        assert!(
            suffix.len() == 5
                && suffix
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{name}"
        );
    }
    assert_ne!(a, b);
    s["metadata"] = json!({});
    let (code, status) = c.ok("POST", SLICES, Some(&s));
    assert_eq!(
        (code, status["reason"].as_str()),
        (422, Some("Invalid")),
        "{status}"
    );
}

#[test]
fn validation() {
    let dir = Dir::new("valid");
    let api = FakeApi::start(false, &dir.0);
    let c = client(&api);
    let mut no_driver = slice("a", "n1", "d.example.com", 1);
    no_driver["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("driver");
    let mut bad_device = slice("b", "n1", "d.example.com", 1);
    bad_device["spec"]["devices"] = json!([{"name": "Bad_Name"}]);
    let mut duplicate = slice("c", "n1", "d.example.com", 0);
    duplicate["spec"]["devices"] = json!([{"name": "x"}, {"name": "x"}]);
    let mut two_selections = slice("d", "n1", "d.example.com", 1);
    two_selections["spec"]["allNodes"] = json!(true);
    let cases = [
        (no_driver, "spec.driver"),
        (slice("e", "n1", "d.example.com", 129), "spec.devices"),
        (bad_device, "spec.devices[0].name"),
        (duplicate, "spec.devices[1].name"),
        (two_selections, "spec"),
        (slice("Upper", "n1", "d.example.com", 1), "metadata.name"),
    ];
    for (body, field) in cases {
        let (code, status) = c.ok("POST", SLICES, Some(&body));
        assert_eq!(
            (code, status["reason"].as_str()),
            (422, Some("Invalid")),
            "{status}"
        );
        assert_eq!(status["details"]["causes"][0]["field"], field, "{status}");
    }
    // The limit itself is allowed.
    let (code, created) = c.ok(
        "POST",
        SLICES,
        Some(&slice("max", "n1", "d.example.com", 128)),
    );
    assert_eq!(code, 201, "{created}");
    let mut bad = created.clone();
    bad["spec"]["devices"] = json!([{"name": "-x"}]);
    let (code, _) = c.ok("PUT", &format!("{SLICES}/max"), Some(&bad));
    assert_eq!(code, 422);
    let (code, status) = c.ok(
        "POST",
        SLICES,
        Some(&json!({"kind": "Node", "apiVersion": "v1"})),
    );
    assert_eq!(
        (code, status["reason"].as_str()),
        (400, Some("BadRequest")),
        "{status}"
    );
    assert_eq!(api.slices().len(), 1);
}

#[test]
fn field_selectors_delete_collection_and_wipe() {
    let dir = Dir::new("select");
    let api = FakeApi::start(false, &dir.0);
    let c = client(&api);
    for (name, node, driver) in [
        ("a", "n1", "d1.example.com"),
        ("b", "n1", "d2.example.com"),
        ("c", "n2", "d1.example.com"),
    ] {
        assert_eq!(
            c.ok("POST", SLICES, Some(&slice(name, node, driver, 1))).0,
            201
        );
    }
    let list = |query: &str| {
        let (code, list) = c.ok("GET", &format!("{SLICES}{query}"), None);
        assert_eq!(code, 200, "{query}: {list}");
        assert!(
            list["metadata"]["resourceVersion"].as_str().is_some(),
            "{list}"
        );
        names(&list)
    };
    assert_eq!(list(""), ["a", "b", "c"]);
    assert_eq!(list("?fieldSelector=spec.nodeName%3Dn1"), ["a", "b"]);
    assert_eq!(
        list("?fieldSelector=spec.driver%3Dd1.example.com"),
        ["a", "c"]
    );
    assert_eq!(
        list("?fieldSelector=spec.nodeName%3Dn1%2Cspec.driver%3Dd1.example.com"),
        ["a"]
    );
    assert_eq!(
        list("?limit=500&fieldSelector=spec.nodeName=n2,spec.driver=d1.example.com"),
        ["c"]
    );
    assert_eq!(
        list("?fieldSelector=spec.nodeName%3Dn3"),
        Vec::<String>::new()
    );
    let (code, status) = c.ok(
        "GET",
        &format!("{SLICES}?fieldSelector=spec.pool.name%3Dn1"),
        None,
    );
    assert_eq!(
        (code, status["reason"].as_str()),
        (400, Some("BadRequest")),
        "{status}"
    );

    let (code, gone) = c.ok(
        "DELETE",
        &format!("{SLICES}?fieldSelector=spec.nodeName%3Dn1%2Cspec.driver%3Dd2.example.com"),
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(names(&gone), ["b"]);
    assert_eq!(list(""), ["a", "c"]);

    // The kubelet's wipe: only the node's slices, optionally only one driver's.
    assert_eq!(
        c.ok("POST", SLICES, Some(&slice("b", "n1", "d2.example.com", 1)))
            .0,
        201
    );
    assert_eq!(api.wipe_slices("n1", Some("d1.example.com")), 1);
    assert_eq!(list(""), ["b", "c"]);
    assert_eq!(api.wipe_slices("n1", None), 1);
    assert_eq!(api.wipe_slices("n1", None), 0);
    assert_eq!(list(""), ["c"]);
}

#[test]
fn nodes_claims_and_unknown_paths() {
    let dir = Dir::new("nodes");
    let api = FakeApi::start(false, &dir.0);
    let c = client(&api);
    let uid = api.add_node("n1");
    let (code, node) = c.ok("GET", "/api/v1/nodes/n1", None);
    assert_eq!((code, node["kind"].as_str()), (200, Some("Node")), "{node}");
    assert_eq!(node["metadata"]["uid"], uid.as_str());
    let (code, status) = c.ok("GET", "/api/v1/nodes/n2", None);
    assert_eq!(
        (code, status["message"].as_str()),
        (404, Some("nodes \"n2\" not found")),
        "{status}"
    );

    let claim_path = "/apis/resource.k8s.io/v1/namespaces/ns1/resourceclaims/cl1";
    api.put_claim(
        json!({"metadata": {"name": "cl1", "namespace": "ns1", "uid": "u-1"}, "spec": {}}),
    );
    let (code, claim) = c.ok("GET", claim_path, None);
    assert_eq!(code, 200, "{claim}");
    assert_eq!(
        (claim["kind"].as_str(), claim["apiVersion"].as_str()),
        (Some("ResourceClaim"), Some("resource.k8s.io/v1"))
    );
    assert_eq!(claim["metadata"]["uid"], "u-1");
    let rv = claim["metadata"]["resourceVersion"].clone();
    api.put_claim(json!({"metadata": {"name": "cl1", "namespace": "ns1", "uid": "u-1"}, "status": {"allocation": {}}}));
    let (_, claim) = c.ok("GET", claim_path, None);
    assert_ne!(claim["metadata"]["resourceVersion"], rv);
    assert!(claim["status"]["allocation"].is_object(), "{claim}");
    api.delete_claim("ns1", "cl1");
    let (code, status) = c.ok("GET", claim_path, None);
    assert_eq!(
        (code, status["details"]["kind"].as_str()),
        (404, Some("resourceclaims")),
        "{status}"
    );

    let (code, status) = c.ok("GET", "/apis/resource.k8s.io/v1beta1/resourceslices", None);
    assert_eq!(
        (code, status["reason"].as_str()),
        (404, Some("NotFound")),
        "{status}"
    );
    let (code, status) = c.ok("POST", "/api/v1/nodes/n1", Some(&json!({})));
    assert_eq!(
        (code, status["reason"].as_str()),
        (405, Some("MethodNotAllowed")),
        "{status}"
    );
}

#[test]
fn auth() {
    let dir = Dir::new("auth");
    let api = FakeApi::start(true, &dir.0);
    let mut c = client(&api);
    assert!(c.token.len() >= 32, "token file holds the token");
    assert_eq!(c.ok("GET", SLICES, None).0, 200);
    let good = c.token.clone();
    c.token = "wrong".into();
    let (code, status) = c.ok("GET", SLICES, None);
    assert_eq!(
        (code, status["reason"].as_str()),
        (401, Some("Unauthorized")),
        "{status}"
    );
    assert_eq!(status["kind"], "Status");
    // Without any Authorization header, even on an unknown path.
    let mut res = c
        .agent
        .get(format!("{}/nowhere", c.base))
        .call()
        .expect("unauthenticated GET");
    assert_eq!(res.status().as_u16(), 401);
    let _ = res.body_mut().read_to_vec();

    api.set_token("rotated");
    c.token = good.clone();
    assert_eq!(
        c.ok("GET", SLICES, None).0,
        401,
        "the old token is refused after set_token"
    );
    c.token = "rotated".into();
    assert_eq!(c.ok("GET", SLICES, None).0, 200);
    assert_eq!(
        std::fs::read_to_string(api.token_file()).expect("token file"),
        good,
        "set_token leaves the file"
    );
}

#[test]
fn fault_status_one_shot_in_order() {
    let dir = Dir::new("status");
    let api = FakeApi::start(false, &dir.0);
    let c = client(&api);
    api.fail_next(
        "PUT /apis/resource.k8s.io/v1/resourceslices/",
        Fault::Status(500),
    );
    api.fail_next(
        "GET /apis/resource.k8s.io/v1/resourceslices",
        Fault::Status(500),
    );
    api.fail_next(
        "GET /apis/resource.k8s.io/v1/resourceslices",
        Fault::Status(429),
    );
    let (code, status) = c.ok("GET", SLICES, None);
    assert_eq!(
        (code, status["reason"].as_str()),
        (500, Some("InternalError")),
        "{status}"
    );
    let res = c.raw("GET", SLICES, None).expect("429");
    assert_eq!(res.status().as_u16(), 429);
    assert_eq!(
        res.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    drop(res);
    assert_eq!(c.ok("GET", SLICES, None).0, 200, "faults are one-shot");
    // The PUT fault is still queued: it matched nothing so far.
    let (code, status) = c.ok(
        "PUT",
        &format!("{SLICES}/x"),
        Some(&slice("x", "n1", "d.example.com", 1)),
    );
    assert_eq!(
        (code, status["code"].as_u64()),
        (500, Some(500)),
        "{status}"
    );
    assert_eq!(
        c.ok(
            "PUT",
            &format!("{SLICES}/x"),
            Some(&slice("x", "n1", "d.example.com", 1))
        )
        .0,
        404
    );
}

#[test]
fn fault_hang_close_oversized() {
    for tls in [false, true] {
        let dir = Dir::new("faults");
        let api = FakeApi::start(tls, &dir.0);
        let c = client(&api);
        let impatient = client_with(&api, api.ca_file().as_deref(), |b| {
            b.timeout_global(Some(Duration::from_secs(1)))
        });

        api.fail_next("GET /api/v1/nodes/", Fault::Hang(Duration::from_secs(30)));
        let start = Instant::now();
        let err = impatient
            .call("GET", "/api/v1/nodes/n1", None)
            .expect_err("a hung request times out");
        assert!(matches!(err, ureq::Error::Timeout(_)), "tls={tls}: {err}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the client's timeout, not the hang, ended it"
        );
        assert_eq!(
            c.ok("GET", "/api/v1/nodes/n1", None).0,
            404,
            "the next request is served"
        );

        api.fail_next("GET /api/v1/nodes/", Fault::Close);
        assert!(
            c.call("GET", "/api/v1/nodes/n1", None).is_err(),
            "tls={tls}: a closed connection is an error"
        );
        assert_eq!(c.ok("GET", "/api/v1/nodes/n1", None).0, 404);

        api.fail_next("resourceclaims", Fault::Oversized(3 << 20));
        let path = "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/big";
        let mut res = c.raw("GET", path, None).expect("oversized answer");
        assert_eq!(res.status().as_u16(), 200);
        let err = res
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .expect_err("over the limit");
        assert!(matches!(err, ureq::Error::BodyExceedsLimit(_)), "{err}");
        api.fail_next("resourceclaims", Fault::Oversized(200_000));
        let mut res = c.raw("GET", path, None).expect("oversized answer");
        let body = res
            .body_mut()
            .read_to_vec()
            .expect("read under the default limit");
        assert_eq!(body.len(), 200_000);
        let claim: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(claim["kind"], "ResourceClaim");

        let statuses: Vec<u16> = api.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [0, 404, 0, 404, 200, 200], "tls={tls}");
        // Drop ends the hung connection's thread at once, not after its 30 s.
        let start = Instant::now();
        drop(api);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "drop took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn tls_with_the_wrong_ca_fails() {
    let (dir_a, dir_b) = (Dir::new("ca-a"), Dir::new("ca-b"));
    let (a, b) = (
        FakeApi::start(true, &dir_a.0),
        FakeApi::start(true, &dir_b.0),
    );
    let c = client_with(&a, b.ca_file().as_deref(), |b| b);
    let err = c
        .call("GET", SLICES, None)
        .expect_err("a server the CA did not sign");
    assert!(
        matches!(err, ureq::Error::Rustls(_) | ureq::Error::Io(_)),
        "{err}"
    );
    assert!(a.requests().is_empty(), "no HTTP request got through");
    assert_eq!(
        client(&b).ok("GET", SLICES, None).0,
        200,
        "the right CA works"
    );
    // Plain HTTP to a TLS port is no answer either.
    let plain = Client {
        base: a.url().replace("https://", "http://"),
        ..client(&a)
    };
    assert!(plain.call("GET", SLICES, None).is_err());
}

#[test]
fn keep_alive() {
    for tls in [false, true] {
        let dir = Dir::new("keepalive");
        let api = FakeApi::start(tls, &dir.0);
        let c = client(&api);
        for _ in 0..3 {
            assert_eq!(c.ok("GET", SLICES, None).0, 200);
        }
        assert_eq!(
            c.ok("POST", SLICES, Some(&slice("a", "n1", "d.example.com", 1)))
                .0,
            201
        );
        let conns: Vec<u64> = api.requests().iter().map(|r| r.conn).collect();
        assert_eq!(conns, [1, 1, 1, 1], "tls={tls}: one pooled connection");
    }
}

/// Writes raw bytes to the fake and reads until it closes the connection.
fn raw_exchange(api: &FakeApi, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(api.url().trim_start_matches("http://")).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the fake closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn raw_http_framing_and_limits() {
    let dir = Dir::new("raw");
    let api = FakeApi::start(false, &dir.0);
    let token = std::fs::read_to_string(api.token_file()).expect("token");
    let get = |extra: &str| {
        format!("GET {SLICES} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}\r\n")
    };

    // Pipelined requests on one connection, answered in order; `Connection: close` ends it.
    let out = raw_exchange(
        &api,
        format!("{}{}", get(""), get("Connection: close\r\n")).as_bytes(),
    );
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    assert!(out.contains("Connection: close\r\n"), "{out}");

    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024));
    assert!(raw_exchange(&api, big.as_bytes()).starts_with("HTTP/1.1 431 "));
    let huge = format!(
        "POST {SLICES} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        9 << 20
    );
    let out = raw_exchange(&api, huge.as_bytes());
    assert!(
        out.starts_with("HTTP/1.1 413 ") && out.contains("RequestEntityTooLarge"),
        "{out}"
    );
    let chunked = format!("POST {SLICES} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(raw_exchange(&api, chunked.as_bytes()).starts_with("HTTP/1.1 411 "));
    assert!(raw_exchange(&api, b"NONSENSE\r\n\r\n").starts_with("HTTP/1.1 400 "));
    // Each exchange is over: the log is complete. Heads too large or malformed are not in it.
    let statuses: Vec<u16> = api.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 413, 411]);
    assert!(api.slices().is_empty());
}

#[test]
fn wait_for_polls_until_true_or_timeout() {
    let dir = Dir::new("wait");
    let api = FakeApi::start(false, &dir.0);
    let start = Instant::now();
    assert_eq!(
        api.wait_for(Duration::from_millis(100), |_| None::<()>),
        None
    );
    assert!(start.elapsed() >= Duration::from_millis(100));
    let c = client(&api);
    let later = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        c.ok("GET", SLICES, None).0
    });
    let seen = api.wait_for(WAIT, |api| api.requests().first().map(|r| r.path.clone()));
    assert_eq!(seen.as_deref(), Some(SLICES));
    assert_eq!(later.join().expect("client thread"), 200);
}
