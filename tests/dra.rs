//! The DRA front-end (`--frontend dra`) through the real binary: a fake kubelet that registers
//! it and calls it over real gRPC on real unix sockets (`common/dra_kubelet.rs`), and a fake
//! API server on 127.0.0.1 that stores slices and claims as kube-apiserver does
//! (`common/fake_api.rs`). Rules from DRA-CONTRACT.md, each cited where tested.
#![cfg(feature = "dra")]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::dra_kubelet::{healths, plugin_args, DraKubelet};
use common::fake_api::{FakeApi, Fault};
use common::*;
use serde_json::{json, Value};

const DRIVER: &str = "rdma.jarvice.com";
const NODE: &str = "node-1";
const UID: &str = "0b1e6a4c-7d2f-4a51-9c1e-2f3a4b5c6d7e";
const UID2: &str = "5d0c2a9e-1b3f-4c6d-8e7f-9a0b1c2d3e4f";

/// A node with three HCAs, an API server, a DRA kubelet and the plugin serving them.
struct Dra {
    plugin: Plugin,
    kubelet: DraKubelet,
    api: FakeApi,
    node_uid: String,
    host: Host,
}

impl Dra {
    fn start(tag: &str, extra: &[&str]) -> Dra {
        Dra::start_tls(tag, false, extra)
    }

    fn start_tls(tag: &str, tls: bool, extra: &[&str]) -> Dra {
        let host = Host::with_hcas(tag);
        let api = FakeApi::start(tls, host.tmp.path());
        let node_uid = api.add_node(NODE);
        let kubelet = DraKubelet::start(&host.tmp.path().join("registry"));
        let plugin = start_plugin(&host, &api, extra);
        Dra {
            plugin,
            kubelet,
            api,
            node_uid,
            host,
        }
    }

    fn cdi_dir(&self) -> PathBuf {
        self.host.tmp.path().join("cdi")
    }

    fn spec_file(&self, uid: &str) -> PathBuf {
        self.cdi_dir().join(format!("{DRIVER}-claim-{uid}.json"))
    }

    /// The one slice of our node, once it satisfies `want`.
    fn slice_where(&self, want: impl Fn(&Value) -> bool) -> Value {
        self.api
            .wait_for(WAIT, |api| {
                api.slices()
                    .into_iter()
                    .find(|s| s["spec"]["nodeName"] == NODE && want(s))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no slice as wanted; slices: {:#?}\n{}",
                    self.api.slices(),
                    self.plugin.log_text()
                )
            })
    }

    /// Stores a claim allocated `devices` (request, device) of our driver in our pool.
    fn allocate(&self, name: &str, uid: &str, devices: &[(&str, &str)]) {
        let results: Vec<Value> = devices
            .iter()
            .map(
                |(req, dev)| json!({"request": req, "driver": DRIVER, "pool": NODE, "device": dev}),
            )
            .collect();
        self.api.put_claim(claim(name, uid, results));
    }
}

fn claim(name: &str, uid: &str, results: Vec<Value>) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": "default", "name": name, "uid": uid},
        "spec": {"devices": {"requests": [{"name": "rdma", "exactly": {"deviceClassName": "rdma.jarvice.com"}}]}},
        "status": {"allocation": {"devices": {"results": results}}},
    })
}

fn start_plugin(host: &Host, api: &FakeApi, extra: &[&str]) -> Plugin {
    let mut args = plugin_args(host, api, NODE);
    // Port states read every 100 ms and counted at once: the tests wait on events, not time.
    args.extend(["--health-interval", "0.1", "--hold-down", "0"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Plugin::start(host, &args)
}

const PER_HCA: &[&str] = &["--resource", "jarvice.com/rdma-hca,mode=per-hca"];

fn device<'a>(slice: &'a Value, name: &str) -> &'a Value {
    slice["spec"]["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no device {name} in {slice:#}"))
}

/// §1: GetInfo says DRAPlugin, our name, the absolute dra.sock, v1.DRAPlugin first; §4: one
/// slice, pool = node, nodeName set, owned by the Node, devices named as DNS labels with the
/// standard attributes (NUMA left out where sysfs says -1... here 0 and 1).
#[test]
fn registers_and_publishes_a_slice_per_node() {
    let d = Dra::start("dra-publish", PER_HCA);
    let r = d.kubelet.expect_registration(1);
    assert_eq!(r.info.type_, "DRAPlugin");
    assert_eq!(r.info.name, DRIVER);
    assert_eq!(
        PathBuf::from(&r.info.endpoint),
        d.host
            .tmp
            .path()
            .join("kplugins")
            .join(DRIVER)
            .join("dra.sock")
    );
    assert_eq!(r.chosen, "v1.DRAPlugin");
    assert_eq!(
        r.socket,
        d.host
            .tmp
            .path()
            .join("registry")
            .join(format!("{DRIVER}-reg.sock"))
    );

    let s = d.slice_where(|s| {
        s["spec"]["devices"]
            .as_array()
            .is_some_and(|d| d.len() == 3)
    });
    assert_eq!(s["spec"]["driver"], DRIVER);
    assert_eq!(s["spec"]["pool"]["name"], NODE);
    assert_eq!(s["spec"]["pool"]["resourceSliceCount"], 1);
    assert!(s["spec"]["pool"]["generation"].as_i64().unwrap() >= 1);
    let owner = &s["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Node");
    assert_eq!(owner["uid"], d.node_uid.as_str());
    assert!(s["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{NODE}-{DRIVER}-")));
    let m0 = device(&s, "mlx5-0");
    let a = &m0["attributes"];
    assert_eq!(
        a["resource.kubernetes.io/pciBusID"]["string"], "0000:10:00.0",
        "{m0:#}"
    );
    assert_eq!(a["resource.kubernetes.io/pcieRoot"]["string"], "pci0000:0f");
    assert!(a["resource.kubernetes.io/pcieRoot"]["string"]
        .as_str()
        .unwrap()
        .starts_with("pci0000:"));
    assert_eq!(a["resource.kubernetes.io/numaNode"]["int"], 0);
    assert_eq!(a["hca"]["string"], "mlx5_0");
    assert_eq!(a["mode"]["string"], "per-hca");
    assert_eq!(a["resource"]["string"], "jarvice.com/rdma-hca");
    assert_eq!(a["linkLayer"]["string"], "InfiniBand");
    assert_eq!(
        device(&s, "mlx5-1")["attributes"]["resource.kubernetes.io/numaNode"]["int"],
        1
    );
    assert_eq!(
        device(&s, "mlx5-2")["attributes"]["linkLayer"]["string"],
        "Ethernet"
    );
    assert!(
        m0.get("taints").is_none_or(Value::is_null),
        "healthy: no taint: {m0:#}"
    );
    assert_eq!(d.api.slices().len(), 1, "one slice per node and driver");
}

/// The default resource through DRA: `shares` devices, each granting every HCA, so
/// `jarvice.com/rdma: 1` (KEP-5004: one unit = one device) still means every HCA of the node.
#[test]
fn shared_mode_publishes_shares_that_grant_every_hca() {
    let d = Dra::start("dra-shared", &["--shares", "3"]);
    let s = d.slice_where(|s| {
        s["spec"]["devices"]
            .as_array()
            .is_some_and(|d| d.len() == 3)
    });
    let names: Vec<&str> = s["spec"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rdma-0", "rdma-1", "rdma-2"]);
    assert_eq!(device(&s, "rdma-1")["attributes"]["hcaCount"]["int"], 3);
    assert_eq!(
        device(&s, "rdma-1")["attributes"]["resource"]["string"],
        "jarvice.com/rdma"
    );

    d.allocate("job", UID, &[("container-0-request-0", "rdma-1")]);
    d.kubelet.expect_registration(1);
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    let one = &resp.claims[UID];
    assert_eq!(one.error, "");
    assert_eq!(
        one.devices[0].cdi_device_ids[0],
        format!("k8s.{DRIVER}/claim={UID}-rdma-1")
    );
    let spec: Value = serde_json::from_slice(&fs::read(d.spec_file(UID)).unwrap()).unwrap();
    let paths: Vec<&str> = spec["devices"][0]["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    for node in ["uverbs0", "uverbs1", "uverbs2", "rdma_cm"] {
        assert!(
            paths.contains(&format!("/dev/infiniband/{node}").as_str()),
            "{paths:?}"
        );
    }
}

/// §2, §5, §7: prepare fetches the claim, takes our driver's results, writes one CDI spec for
/// the claim (UID in the device names) and answers the CDI IDs; twice gives the same answer
/// (from the record, without the API server); unprepare removes it; an unknown claim's
/// unprepare succeeds.
#[test]
fn prepare_writes_a_cdi_spec_per_claim_and_unprepare_removes_it() {
    let d = Dra::start(
        "dra-prepare",
        &[
            "--resource",
            "jarvice.com/rdma-hca,mode=per-hca",
            "--hca-envs",
        ],
    );
    d.slice_where(|_| true);
    d.allocate("job", UID, &[("hcas", "mlx5-0"), ("hcas", "mlx5-2")]);
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    let one = &resp.claims[UID];
    assert_eq!(one.error, "", "{}", d.plugin.log_text());
    let ids: Vec<&str> = one
        .devices
        .iter()
        .map(|x| x.cdi_device_ids[0].as_str())
        .collect();
    assert_eq!(
        ids,
        [
            format!("k8s.{DRIVER}/claim={UID}-mlx5-0"),
            format!("k8s.{DRIVER}/claim={UID}-mlx5-2")
        ]
    );
    assert_eq!(one.devices[0].pool_name, NODE);
    assert_eq!(one.devices[0].device_name, "mlx5-0");
    assert_eq!(one.devices[0].request_names, ["hcas"]);

    let spec: Value = serde_json::from_slice(&fs::read(d.spec_file(UID)).unwrap()).unwrap();
    assert_eq!(spec["kind"], format!("k8s.{DRIVER}/claim"));
    assert!(
        spec["cdiVersion"].as_str().unwrap() >= "0.5.0",
        "a name starting with a digit needs 0.5.0"
    );
    let dev0 = &spec["devices"][0];
    assert_eq!(dev0["name"], format!("{UID}-mlx5-0"));
    let nodes: Vec<&str> = dev0["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    // mlx5_0's verbs node is uverbs1 (the mock's names are out of order on purpose).
    assert_eq!(
        nodes,
        ["/dev/infiniband/uverbs1", "/dev/infiniband/rdma_cm"]
    );
    // The envs Allocate sets for per-HCA grants, once for the claim.
    assert_eq!(
        spec["containerEdits"]["env"],
        json!([
            "JARVICE_RDMA_HCAS=mlx5_0,mlx5_2",
            "NCCL_IB_HCA==mlx5_0,mlx5_2",
            "UCX_NET_DEVICES=mlx5_0:1,mlx5_2:1"
        ])
    );

    // Twice: the same answer, and the API server is not asked again.
    let gets = |api: &FakeApi| {
        api.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/resourceclaims/"))
            .count()
    };
    let before = gets(&d.api);
    let again = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(again.claims[UID], resp.claims[UID]);
    assert_eq!(gets(&d.api), before);

    let un = d
        .kubelet
        .unprepare(&[("default", "job", UID), ("default", "never", UID2)])
        .unwrap();
    assert_eq!(un.claims.len(), 2, "every claim gets an entry");
    assert_eq!(un.claims[UID].error, "");
    assert_eq!(un.claims[UID2].error, "", "unknown claims succeed");
    assert!(!d.spec_file(UID).exists());
}

/// §2: a restart neither loses nor repeats work: the record of prepared claims is the spec
/// files. After a restart, a repeat prepare is answered without the API server (which now
/// fails every claim fetch) and unprepare still removes the spec.
#[test]
fn restart_keeps_the_record_of_prepared_claims() {
    let mut d = Dra::start("dra-restart", PER_HCA);
    d.slice_where(|_| true);
    d.allocate("job", UID, &[("r", "mlx5-1")]);
    let first = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(first.claims[UID].error, "");
    d.plugin.signal(libc::SIGTERM);
    assert!(d.plugin.wait_exit(WAIT).is_some_and(|s| s.success()));
    assert!(
        d.spec_file(UID).exists(),
        "specs stay at exit: running pods restart containers with them"
    );
    d.api.delete_claim("default", "job");
    d.plugin = start_plugin(&d.host, &d.api, PER_HCA);
    // The kubelet sees the new registration socket and registers the plugin again.
    d.kubelet.expect_registration(2);
    let again = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(
        again.claims[UID],
        first.claims[UID],
        "{}",
        d.plugin.log_text()
    );
    let un = d.kubelet.unprepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(un.claims[UID].error, "");
    assert!(!d.spec_file(UID).exists());
}

/// Hostile claims, each a per-claim error and nothing else (no spec written, the call
/// answered, the other claims of the call prepared): another driver's results only, a UID that
/// changed, 10,000 results, a device name with control characters, a device we never published,
/// another node's pool, a UID that would name a file elsewhere.
#[test]
fn hostile_claims_get_a_per_claim_error_and_nothing_else() {
    let d = Dra::start("dra-hostile", PER_HCA);
    d.slice_where(|_| true);
    let uids = [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        "00000000-0000-4000-8000-000000000003",
        "00000000-0000-4000-8000-000000000004",
        "00000000-0000-4000-8000-000000000005",
        "00000000-0000-4000-8000-000000000006",
    ];
    let other_driver =
        json!({"request": "r", "driver": "gpu.example.com", "pool": NODE, "device": "mlx5-0"});
    d.api.put_claim(claim("other", uids[0], vec![other_driver]));
    // The claim was deleted and made again under the same name: its UID is not the kubelet's.
    d.allocate(
        "changed",
        "99999999-0000-4000-8000-000000000000",
        &[("r", "mlx5-0")],
    );
    let many: Vec<Value> = (0..10_000)
        .map(|i| json!({"request": "r", "driver": DRIVER, "pool": NODE, "device": format!("d{i}")}))
        .collect();
    d.api.put_claim(claim("many", uids[2], many));
    d.allocate("ctl", uids[3], &[("r", "mlx5-0\n\u{1b}[31m")]);
    d.allocate("ghost", uids[4], &[("r", "mlx5-9")]);
    let other_pool =
        json!({"request": "r", "driver": DRIVER, "pool": "node-2", "device": "mlx5-0"});
    d.api
        .put_claim(claim("elsewhere", uids[5], vec![other_pool]));
    d.allocate("good", UID, &[("r", "mlx5-1")]);

    let resp = d
        .kubelet
        .prepare(&[
            ("default", "other", uids[0]),
            ("default", "changed", uids[1]),
            ("default", "many", uids[2]),
            ("default", "ctl", uids[3]),
            ("default", "ghost", uids[4]),
            ("default", "elsewhere", uids[5]),
            ("default", "good", UID),
            ("default", "escape", "../../../../etc/cron.d/x"),
        ])
        .unwrap();
    assert_eq!(resp.claims.len(), 8, "every claim gets an entry");
    let err = |uid: &str| resp.claims[uid].error.clone();
    assert!(
        err(uids[0]).contains("no device of driver"),
        "{}",
        err(uids[0])
    );
    assert!(
        err(uids[1]).contains("deleted and made again"),
        "{}",
        err(uids[1])
    );
    assert!(
        err(uids[2]).contains("than any node publishes"),
        "{}",
        err(uids[2])
    );
    assert!(
        err(uids[3]).contains("not one this node publishes"),
        "{}",
        err(uids[3])
    );
    assert!(
        !err(uids[3]).contains('\u{1b}'),
        "control characters escaped"
    );
    assert!(
        err(uids[4]).contains("not one this node publishes"),
        "{}",
        err(uids[4])
    );
    assert!(err(uids[5]).contains("not this node's"), "{}", err(uids[5]));
    assert!(err("../../../../etc/cron.d/x").contains("not a UID"));
    for u in uids {
        assert!(resp.claims[u].devices.is_empty());
        assert!(!d.spec_file(u).exists());
    }
    assert_eq!(err(UID), "");
    let files: Vec<String> = fs::read_dir(d.cdi_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        [format!("{DRIVER}-claim-{UID}.json")],
        "nothing else written"
    );
    // No claim fetch for the UID that is not a UID.
    assert!(!d.api.requests().iter().any(|r| r.path.contains("escape")));
}

/// §3 and KEP-5055: a dead HCA gets a NoSchedule taint with our key and the reason, stays
/// published, and is Unhealthy in the health stream; the taint goes at once when the port is
/// back.
#[test]
fn a_dead_port_taints_its_device_and_the_taint_goes_when_it_is_back() {
    let d = Dra::start("dra-taint", PER_HCA);
    d.slice_where(|_| true);
    d.kubelet.expect_registration(1);
    let mut health = d.kubelet.watch_health();
    let first = health.until(|l| l.devices.len() == 3);
    assert!(
        healths(&first).iter().all(|(_, h)| h == "HEALTHY"),
        "{first:?}"
    );
    assert_eq!(first.devices[0].device.pool_name, NODE);
    assert_eq!(first.devices[0].health_check_timeout_seconds, 30);

    d.host
        .set_port("mlx5_1", 1, rdma_plugin::host::mock::DOWN_POLLING);
    let s = d.slice_where(|s| {
        device(s, "mlx5-1")
            .get("taints")
            .is_some_and(|t| t.is_array())
    });
    let taint = &device(&s, "mlx5-1")["taints"][0];
    assert_eq!(taint["key"], format!("{DRIVER}/unhealthy"));
    assert_eq!(taint["effect"], "NoSchedule");
    assert!(
        taint["value"].as_str().unwrap().contains("mlx5_1"),
        "{taint:#}"
    );
    assert!(taint["timeAdded"].is_string());
    assert!(device(&s, "mlx5-0")
        .get("taints")
        .is_none_or(Value::is_null));
    let down = health.until(|l| healths(l).contains(&("mlx5-1".into(), "UNHEALTHY".into())));
    let msg = &down
        .devices
        .iter()
        .find(|x| x.device.device_name == "mlx5-1")
        .unwrap()
        .message;
    assert!(msg.contains("DOWN"), "{msg}");

    d.host
        .set_port("mlx5_1", 1, rdma_plugin::host::mock::ACTIVE);
    d.slice_where(|s| device(s, "mlx5-1").get("taints").is_none_or(Value::is_null));
    health.until(|l| healths(l).iter().all(|(_, h)| h == "HEALTHY"));
}

/// §1 wipes: the kubelet deletes the node's slices at its start (and registers us again);
/// the slice comes back.
#[test]
fn a_wiped_slice_is_published_again_after_the_kubelet_registers() {
    let d = Dra::start("dra-wipe", PER_HCA);
    d.slice_where(|_| true);
    d.kubelet.expect_registration(1);
    assert_eq!(d.api.wipe_slices(NODE, None), 1);
    d.kubelet.register_again();
    let s = d.slice_where(|_| true);
    assert_eq!(s["spec"]["devices"].as_array().unwrap().len(), 3);
    assert_eq!(d.api.slices().len(), 1);
}

/// Writes `files` the way the kubelet's atomic writer fills a projected service-account
/// volume (`pkg/volume/util/atomic_writer.go`): the data in a timestamped directory, a `..data`
/// symlink to it swapped with rename(2), and each visible name a symlink through `..data`.
fn project(dir: &Path, generation: u32, files: &[(&str, &[u8])]) {
    let data = format!("..2026_12_03_{generation}");
    fs::create_dir_all(dir.join(&data)).unwrap();
    for (name, bytes) in files {
        fs::write(dir.join(&data).join(name), bytes).unwrap();
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// §4 in-cluster config, as a pod sees it: HTTPS with the cluster CA as the only root, token
/// and CA read through the projected volume's symlinks, and a token the kubelet rotates (a new
/// `..data`) read again after the API server's 401.
#[test]
fn https_with_the_projected_token_and_ca_and_a_rotation() {
    let host = Host::with_hcas("dra-tls");
    let api = FakeApi::start(true, host.tmp.path());
    api.add_node(NODE);
    let sa = host.tmp.path().join("serviceaccount");
    let ca = fs::read(api.ca_file().unwrap()).unwrap();
    let token = fs::read(api.token_file()).unwrap();
    project(&sa, 1, &[("token", &token), ("ca.crt", &ca)]);
    let kubelet = DraKubelet::start(&host.tmp.path().join("registry"));
    let mut args = plugin_args(&host, &api, NODE);
    for (flag, value) in [("--kube-token-file", "token"), ("--kube-ca-file", "ca.crt")] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = sa.join(value).display().to_string();
    }
    args.extend(PER_HCA.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let plugin = Plugin::start(&host, &args);
    api.wait_for(WAIT, |api| api.slices().into_iter().next())
        .unwrap_or_else(|| panic!("no slice: {}", plugin.log_text()));
    assert!(
        !api.requests().iter().any(|r| r.status == 401),
        "the projected token was read"
    );

    // The kubelet rotates the token: a new data directory, `..data` swapped.
    api.set_token("rotated-token");
    project(&sa, 2, &[("token", b"rotated-token"), ("ca.crt", &ca)]);
    api.put_claim(claim(
        "job",
        UID,
        vec![json!({"request": "r", "driver": DRIVER, "pool": NODE, "device": "mlx5-0"})],
    ));
    let resp = kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(resp.claims[UID].error, "", "{}", plugin.log_text());
    // The old token was refused once (by whichever request came first: the claim's GET or
    // the publisher's), then read again.
    assert!(api.requests().iter().any(|r| r.status == 401));
}

/// §2: an answer well within the kubelet's 45 s when the API server hangs: the claim gets an
/// error (the kubelet retries) and the call is answered.
#[test]
fn a_hanging_api_server_gives_a_per_claim_error_in_time() {
    let d = Dra::start("dra-hang", PER_HCA);
    d.slice_where(|_| true);
    d.allocate("job", UID, &[("r", "mlx5-0")]);
    d.api.fail_next(
        "GET /apis/resource.k8s.io/v1/namespaces/",
        Fault::Hang(Duration::from_secs(60)),
    );
    let start = std::time::Instant::now();
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "{:?}",
        start.elapsed()
    );
    assert!(
        resp.claims[UID].error.contains("cannot fetch"),
        "{}",
        resp.claims[UID].error
    );
    // The next sync of the pod succeeds.
    let again = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(again.claims[UID].error, "");
}

/// §KEP-5004: one front-end per resource name on a node; `dra` refuses to start while our
/// device plugin for the same name is registered there, and says why.
#[test]
fn refuses_to_start_beside_the_device_plugin_of_the_same_name() {
    let host = Host::with_hcas("dra-rival");
    let (_kubelet, _dp) = start_registered(&host, &[]);
    let api = FakeApi::start(false, host.tmp.path());
    api.add_node(NODE);
    let mut p = start_plugin(&host, &api, &["--events"]);
    let status = p.wait_exit(WAIT).expect("exits");
    assert_eq!(status.code(), Some(2));
    assert!(
        p.log_text().contains("one front-end per name"),
        "{}",
        p.log_text()
    );
    // With --events, the collision is a Warning on the Node before the process ends.
    let events = api.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "RdmaFrontendConflict");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["regarding"]["name"], NODE);
}

/// Metrics of the DRA front-end: the devices published per resource, those prepared claims
/// hold (back to 0 after unprepare), prepare and unprepare counted by call and by claim, the
/// slice writes, and the registration.
#[cfg(feature = "metrics")]
#[test]
fn metrics_follow_prepares_and_the_slice() {
    use common::scrape::{metrics_addr, scrape, scrape_until, value};
    let mut extra = PER_HCA.to_vec();
    extra.extend(["--metrics-address", "127.0.0.1:0"]);
    let d = Dra::start("dra-metrics", &extra);
    d.kubelet.expect_registration(1);
    d.slice_where(|_| true);
    let addr = metrics_addr(&d.plugin);
    let hca = [("resource", "jarvice.com/rdma-hca")];
    let s = scrape_until(addr, "registered", |s| {
        value(s, "jarvice_rdma_registered", &hca) == Some(1.0)
    });
    assert_eq!(value(&s, "jarvice_rdma_resource_devices", &hca), Some(3.0));
    assert_eq!(
        value(&s, "jarvice_rdma_resource_devices_allocated", &hca),
        Some(0.0)
    );
    assert!(
        value(
            &s,
            "jarvice_rdma_resourceslice_writes_total",
            &[("result", "ok")]
        ) >= Some(1.0)
    );
    assert_eq!(
        value(&s, "jarvice_rdma_build_info", &[("frontend", "dra")]),
        Some(1.0)
    );

    d.allocate("job", UID, &[("rdma", "mlx5-0")]);
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert!(resp.claims[UID].error.is_empty(), "{:?}", resp.claims[UID]);
    let s = scrape(addr);
    assert_eq!(
        value(&s, "jarvice_rdma_resource_devices_allocated", &hca),
        Some(1.0)
    );
    let prep = [("rpc", "NodePrepareResources"), ("code", "OK")];
    assert_eq!(value(&s, "jarvice_rdma_requests_total", &prep), Some(1.0));
    let ok = [("rpc", "NodePrepareResources"), ("result", "ok")];
    assert_eq!(value(&s, "jarvice_rdma_claims_total", &ok), Some(1.0));
    assert_eq!(
        value(&s, "jarvice_rdma_allocated_devices_total", &hca),
        Some(1.0)
    );
    // A repeat (the kubelet retries, or restarts) grants nothing new; readings of the host
    // (every 100 ms here) keep what the claims hold.
    d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let s = scrape(addr);
    let total = value(&s, "jarvice_rdma_allocated_devices_total", &hca);
    assert_eq!(total, Some(1.0));
    let held = value(&s, "jarvice_rdma_resource_devices_allocated", &hca);
    assert_eq!(held, Some(1.0));

    d.kubelet.unprepare(&[("default", "job", UID)]).unwrap();
    let s = scrape(addr);
    assert_eq!(
        value(&s, "jarvice_rdma_resource_devices_allocated", &hca),
        Some(0.0)
    );
    let un = [("rpc", "NodeUnprepareResources"), ("code", "OK")];
    assert_eq!(value(&s, "jarvice_rdma_requests_total", &un), Some(1.0));
}

/// `probe --frontend dra` checks both sockets as the kubelet uses them (the DaemonSet's
/// liveness probe); `list --frontend dra` prints the slice this node would publish.
#[test]
fn probe_and_list_through_dra() {
    let d = Dra::start("dra-tools", PER_HCA);
    d.kubelet.expect_registration(1);
    let tmp = d.host.tmp.path();
    let registry = tmp.join("registry").display().to_string();
    let plugins = tmp.join("kplugins").display().to_string();
    let flags = [
        "--frontend",
        "dra",
        "--kubelet-registry-dir",
        registry.as_str(),
        "--kubelet-plugins-dir",
        plugins.as_str(),
    ];
    let mut args = vec!["probe"];
    args.extend(flags);
    let out = run(&d.host, &args);
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("DRAPlugin rdma.jarvice.com"),
        "{}",
        stdout(&out)
    );

    let mut args = vec!["list", "--node-name", NODE];
    args.extend(flags);
    args.extend(PER_HCA);
    let out = run(&d.host, &args);
    assert!(out.status.success());
    let text = stdout(&out);
    let json_end = text.rfind('}').unwrap() + 1;
    let s: Value = serde_json::from_str(&text[..json_end]).unwrap();
    assert_eq!(s["spec"]["pool"]["name"], NODE);
    assert_eq!(
        device(&s, "mlx5-1")["attributes"]["hca"]["string"],
        "mlx5_1"
    );

    // With the plugin gone, the probe fails.
    let mut d = d;
    d.plugin.signal(libc::SIGTERM);
    d.plugin.wait_exit(WAIT);
    let mut args = vec!["probe"];
    args.extend(flags);
    assert!(!run(&d.host, &args).status.success());
}

/// The API server fails a create (500) and then an update (409: someone changed the slice since
/// we read it, kube-apiserver's optimistic concurrency): both are retried and the slice ends as
/// the host is. SIGHUP reads the host again and does not end the process.
#[test]
fn failed_writes_are_retried_and_sighup_is_harmless() {
    let host = Host::with_hcas("dra-retry");
    let api = FakeApi::start(false, host.tmp.path());
    api.add_node(NODE);
    api.fail_next(
        "POST /apis/resource.k8s.io/v1/resourceslices",
        Fault::Status(500),
    );
    let _kubelet = DraKubelet::start(&host.tmp.path().join("registry"));
    let mut plugin = start_plugin(&host, &api, PER_HCA);
    let d = |want: &dyn Fn(&Value) -> bool| {
        api.wait_for(WAIT, |api| api.slices().into_iter().find(|s| want(s)))
            .unwrap_or_else(|| panic!("{:#?}\n{}", api.slices(), plugin.log_text()))
    };
    d(&|_| true);
    assert!(api
        .requests()
        .iter()
        .any(|r| r.method == "POST" && r.status == 500));

    api.fail_next(
        "PUT /apis/resource.k8s.io/v1/resourceslices/",
        Fault::Status(409),
    );
    host.set_port("mlx5_0", 1, rdma_plugin::host::mock::DOWN_POLLING);
    d(&|s| {
        device(s, "mlx5-0")
            .get("taints")
            .is_some_and(|t| t.is_array())
    });
    assert!(api
        .requests()
        .iter()
        .any(|r| r.method == "PUT" && r.status == 409));
    assert_eq!(api.slices().len(), 1);

    plugin.signal(libc::SIGHUP);
    assert!(plugin.wait_log("SIGHUP"));
    assert!(
        plugin.wait_exit(Duration::from_millis(300)).is_none(),
        "SIGHUP does not stop it"
    );
    plugin.signal(libc::SIGTERM);
    assert!(plugin.wait_exit(WAIT).is_some_and(|s| s.success()));
}

/// `diagnose --frontend dra`: the driver answers, no rival device plugin, the API server takes
/// our token and RBAC lets us read, the CDI dir, and the runtime's CDI where the host's
/// configuration shows it; a rejected token is a failure that says so.
#[test]
fn diagnose_through_dra() {
    let d = Dra::start("dra-diag", PER_HCA);
    d.kubelet.expect_registration(1);
    d.slice_where(|_| true);
    let tmp = d.host.tmp.path();
    let registry = tmp.join("registry").display().to_string();
    let plugins = tmp.join("kplugins").display().to_string();
    let cdi = tmp.join("cdi").display().to_string();
    let url = d.api.url();
    let token = d.api.token_file().display().to_string();
    let args = [
        "diagnose",
        "--json",
        "--frontend",
        "dra",
        "--node-name",
        NODE,
        "--kube-api",
        url.as_str(),
        "--kube-token-file",
        token.as_str(),
        "--kubelet-registry-dir",
        registry.as_str(),
        "--kubelet-plugins-dir",
        plugins.as_str(),
        "--cdi-dir",
        cdi.as_str(),
    ];
    let status_of = |out: &std::process::Output, name: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(&stdout(out)).unwrap();
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == name)
            .map(|c| {
                format!(
                    "{} {}",
                    c["status"].as_str().unwrap(),
                    c["message"].as_str().unwrap()
                )
            })
            .collect()
    };
    let out = run(&d.host, &args);
    // (memlock may fail on this machine: the checks of interest are looked at one by one.)
    assert!(
        status_of(&out, "driver")[0].starts_with("ok"),
        "{}",
        stdout(&out)
    );
    assert!(
        status_of(&out, "cdi dir")[0].starts_with("ok"),
        "{}",
        stdout(&out)
    );
    assert!(
        status_of(&out, "api").iter().all(|s| s.starts_with("ok")),
        "{}",
        stdout(&out)
    );
    assert!(status_of(&out, "front-ends")[0].starts_with("ok"));
    assert!(
        status_of(&out, "runtime cdi")[0].starts_with("warn"),
        "no runtime config under the host root"
    );

    fs::create_dir_all(d.host.root().join("etc/containerd")).unwrap();
    fs::write(
        d.host.root().join("etc/containerd/config.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  enable_cdi = true\n",
    )
    .unwrap();
    d.api.set_token("another");
    let out = run(&d.host, &args);
    assert!(!out.status.success());
    assert!(
        status_of(&out, "runtime cdi")[0].starts_with("ok"),
        "{}",
        stdout(&out)
    );
    let api = status_of(&out, "api");
    assert!(
        api[0].starts_with("fail") && api[0].contains("401"),
        "{api:?}"
    );
}

/// Bad answers from the API server at prepare: a claim that is gone (404), an answer larger
/// than we read (oversized), a 500: each a per-claim error; the driver keeps serving and the
/// next try succeeds.
#[test]
fn api_errors_at_prepare_are_per_claim_and_passing() {
    let d = Dra::start("dra-apierr", PER_HCA);
    d.slice_where(|_| true);
    d.allocate("job", UID, &[("r", "mlx5-0")]);
    let claims = [("default", "gone", UID2), ("default", "job", UID)];
    d.api.fail_next(
        "GET /apis/resource.k8s.io/v1/namespaces/default/resourceclaims/job",
        Fault::Oversized(6 << 20),
    );
    let resp = d.kubelet.prepare(&claims).unwrap();
    assert!(
        resp.claims[UID2].error.contains("does not exist"),
        "{}",
        resp.claims[UID2].error
    );
    assert!(
        resp.claims[UID].error.contains("cannot fetch"),
        "{}",
        resp.claims[UID].error
    );
    d.api.fail_next(
        "GET /apis/resource.k8s.io/v1/namespaces/",
        Fault::Status(500),
    );
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert!(
        resp.claims[UID].error.contains("500"),
        "{}",
        resp.claims[UID].error
    );
    assert!(!d.spec_file(UID).exists());
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(resp.claims[UID].error, "");
}

/// Later kubelets call the health service as `v1.DRAResourceHealth`: same messages, served too.
#[test]
fn health_is_served_as_v1_too() {
    let d = Dra::start("dra-health-v1", PER_HCA);
    let r = d.kubelet.expect_registration(1);
    assert!(r
        .info
        .supported_versions
        .contains(&"v1.DRAResourceHealth".to_string()));
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    let ch = grpcio::ChannelBuilder::new(env).connect(&format!("unix:{}", r.info.endpoint));
    let client = grpcio::Client::new(ch);
    let req = rdma_plugin::dra::proto::dra_health::NodeWatchResourcesRequest::new();
    let mut stream = client
        .server_streaming(
            &rdma_plugin::dra::proto::METHOD_HEALTH_V1_WATCH,
            &req,
            grpcio::CallOption::default(),
        )
        .unwrap();
    let first = rdma_plugin::wake::block_on(
        std::future::poll_fn(|cx| {
            futures_core::Stream::poll_next(std::pin::Pin::new(&mut stream), cx)
        }),
        Some(WAIT),
    )
    .flatten()
    .expect("a list")
    .expect("no error");
    assert_eq!(first.devices.len(), 3);
}

/// The API's limit: a slice holds at most 64 devices once any has a taint. A node with more
/// (70 HCAs: virtual functions) publishes a pool of two slices with `resourceSliceCount: 2`,
/// and a change rewrites both with the next generation (the scheduler takes a pool only when
/// all its slices have the newest one).
#[test]
fn more_than_64_devices_make_a_pool_of_slices() {
    let host = Host::empty("dra-pool");
    for i in 0..70 {
        host.add_hca(&rdma_plugin::host::mock::MockHca::connectx(i));
    }
    let api = FakeApi::start(false, host.tmp.path());
    api.add_node(NODE);
    let _kubelet = DraKubelet::start(&host.tmp.path().join("registry"));
    let plugin = start_plugin(&host, &api, PER_HCA);
    let pool = |want: &dyn Fn(&[Value]) -> bool| {
        api.wait_for(WAIT, |api| {
            let s = api.slices();
            want(&s).then_some(s)
        })
        .unwrap_or_else(|| panic!("{:#?}\n{}", api.slices(), plugin.log_text()))
    };
    let gen = |s: &Value| s["spec"]["pool"]["generation"].as_i64().unwrap();
    let slices = pool(&|s| s.len() == 2);
    let sizes: Vec<usize> = slices
        .iter()
        .map(|s| s["spec"]["devices"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 70);
    assert!(sizes.iter().all(|n| *n <= 64), "{sizes:?}");
    assert!(slices
        .iter()
        .all(|s| s["spec"]["pool"]["resourceSliceCount"] == 2));
    assert_eq!(gen(&slices[0]), gen(&slices[1]));
    let before = gen(&slices[0]);

    host.set_port("mlx5_3", 1, rdma_plugin::host::mock::DOWN_POLLING);
    let after =
        pool(&|s| s.len() == 2 && s.iter().all(|x| gen(x) > before) && gen(&s[0]) == gen(&s[1]));
    let tainted: usize = after
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().unwrap().iter())
        .filter(|d| d["taints"].is_array())
        .count();
    assert_eq!(tainted, 1);
}

/// An HCA whose verbs node is gone: its device is tainted (health from the nodes too), and a
/// claim already allocated to it gets an error rather than a spec granting nothing usable (as
/// Allocate refuses).
#[test]
fn a_device_without_its_verbs_node_is_tainted_and_not_prepared() {
    let d = Dra::start("dra-noverbs", PER_HCA);
    d.slice_where(|_| true);
    d.allocate("job", UID, &[("r", "mlx5-0")]);
    // mlx5_0's verbs node is uverbs1.
    d.host.remove_node("uverbs1");
    d.slice_where(|s| {
        device(s, "mlx5-0")
            .get("taints")
            .is_some_and(|t| t.is_array())
    });
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert!(
        resp.claims[UID].error.contains("no uverbs node"),
        "{}",
        resp.claims[UID].error
    );
    assert!(!d.spec_file(UID).exists());
}

/// The kubelet cancels a prepare and unprepares when a pod goes: an unprepare that comes
/// while the prepare waits for the API server wins, and no spec is left to hold the device.
/// A record whose claim is gone (no unprepare ever came) does not block its device for ever:
/// the API server is asked, and the stale spec goes.
#[test]
fn unprepare_during_prepare_and_stale_records_hold_nothing() {
    let d = Dra::start("dra-race", PER_HCA);
    d.slice_where(|_| true);
    d.kubelet.expect_registration(1);
    d.allocate("job", UID, &[("r", "mlx5-0")]);
    d.api.fail_next(
        "GET /apis/resource.k8s.io/v1/namespaces/default/resourceclaims/job",
        Fault::Delay(Duration::from_secs(2)),
    );
    let preparing = {
        let registry = d.kubelet.registry.clone();
        std::thread::spawn(move || {
            let k = DraKubelet::start(&registry);
            k.prepare(&[("default", "job", UID)]).unwrap()
        })
    };
    // The prepare is waiting for its claim.
    assert!(wait_for(WAIT, || d
        .api
        .requests()
        .iter()
        .any(
            |r| r.path.ends_with("/resourceclaims/job") && r.status == 0
        )));
    let un = d.kubelet.unprepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(un.claims[UID].error, "");
    let late = preparing.join().unwrap();
    assert!(
        late.claims[UID]
            .error
            .contains("unprepared while being prepared"),
        "{:?}",
        late.claims[UID]
    );
    assert!(!d.spec_file(UID).exists(), "no spec after the unprepare");

    // A claim prepared, then deleted with no unprepare (the kubelet's state lost): its record
    // would hold mlx5-1. A new claim on mlx5-1 is prepared once the API server says the old one
    // is gone.
    d.allocate("old", UID2, &[("r", "mlx5-1")]);
    assert_eq!(
        d.kubelet
            .prepare(&[("default", "old", UID2)])
            .unwrap()
            .claims[UID2]
            .error,
        ""
    );
    let third = "00000000-0000-4000-8000-0000000000aa";
    d.allocate("new", third, &[("r", "mlx5-1")]);
    let refused = d.kubelet.prepare(&[("default", "new", third)]).unwrap();
    assert!(
        refused.claims[third].error.contains("still"),
        "the old claim still exists: {:?}",
        refused.claims[third]
    );
    d.api.delete_claim("default", "old");
    let resp = d.kubelet.prepare(&[("default", "new", third)]).unwrap();
    assert_eq!(resp.claims[third].error, "", "{}", d.plugin.log_text());
    assert!(!d.spec_file(UID2).exists(), "the stale spec went");
    assert!(d.spec_file(third).exists());
}

/// A result of a subrequest (`rdma/one-hca`, from `firstAvailable`) answers for its request:
/// the kubelet gives a container the CDI IDs of the results whose request names it uses
/// (`claiminfo.go`), and containers name requests, not subrequests. Admin access shares a
/// device with a claim that holds it.
#[test]
fn subrequests_answer_for_their_request_and_admin_access_shares() {
    let d = Dra::start("dra-subreq", PER_HCA);
    d.slice_where(|_| true);
    d.allocate("job", UID, &[("rdma/one-hca", "mlx5-0")]);
    let resp = d.kubelet.prepare(&[("default", "job", UID)]).unwrap();
    assert_eq!(resp.claims[UID].error, "");
    assert_eq!(resp.claims[UID].devices[0].request_names, ["rdma"]);

    let admin = json!({"request": "mon", "driver": DRIVER, "pool": NODE, "device": "mlx5-0", "adminAccess": true});
    d.api.put_claim(claim("monitor", UID2, vec![admin]));
    let resp = d.kubelet.prepare(&[("default", "monitor", UID2)]).unwrap();
    assert_eq!(
        resp.claims[UID2].error, "",
        "admin access may share the device"
    );
}

/// §1: deregistration happens only when the registration socket is deleted; an operator who
/// deletes either socket gets them made again at once (inotify) and a new registration.
#[test]
fn deleted_sockets_are_made_again_and_registered() {
    let d = Dra::start("dra-sockets", PER_HCA);
    let first = d.kubelet.expect_registration(1);
    fs::remove_file(&first.socket).unwrap();
    let second = d.kubelet.expect_registration(2);
    assert_eq!(second.socket, first.socket);
    fs::remove_file(&second.info.endpoint).unwrap();
    // The service socket again, and a registration that tells the kubelet of it.
    d.kubelet.expect_registration(3);
    assert!(Path::new(&second.info.endpoint).exists());
    d.allocate("job", UID, &[("r", "mlx5-0")]);
    assert_eq!(
        d.kubelet
            .prepare(&[("default", "job", UID)])
            .unwrap()
            .claims[UID]
            .error,
        ""
    );
}

/// A device node made (a driver loaded, an HCA hot-plugged) is seen at once through inotify,
/// not at the next port-state reading: here readings are a minute apart, longer than any wait.
#[test]
fn a_new_hca_is_published_without_waiting_for_the_next_reading() {
    let host = Host::with_hcas("dra-hotplug");
    let api = FakeApi::start(false, host.tmp.path());
    api.add_node(NODE);
    let _kubelet = DraKubelet::start(&host.tmp.path().join("registry"));
    let mut args = plugin_args(&host, &api, NODE);
    args.extend(["--health-interval", "60"].map(String::from));
    args.extend(PER_HCA.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let plugin = Plugin::start(&host, &args);
    let devices = |api: &FakeApi| -> Vec<String> {
        api.slices()
            .iter()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    };
    api.wait_for(WAIT, |api| (devices(api).len() == 3).then_some(()))
        .unwrap_or_else(|| panic!("{}", plugin.log_text()));
    host.add_hca(&rdma_plugin::host::mock::MockHca::connectx(3));
    api.wait_for(WAIT, |api| {
        devices(api).contains(&"mlx5-3".to_string()).then_some(())
    })
    .unwrap_or_else(|| panic!("{:?}\n{}", devices(&api), plugin.log_text()));
}

/// A hostile device tree: mlx5_0's verbs node replaced by a symlink to another file. The scan
/// refuses it, so no spec ever names the link or its target; the device is tainted and a claim
/// on it is refused. The other HCAs' claims are unaffected.
#[test]
fn a_symlinked_device_node_is_never_granted_through_dra() {
    let d = Dra::start("dra-symlink", PER_HCA);
    d.slice_where(|_| true);
    let node = d.host.root().join("dev/infiniband/uverbs1");
    fs::remove_file(&node).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", &node).unwrap();
    d.slice_where(|s| {
        device(s, "mlx5-0")
            .get("taints")
            .is_some_and(|t| t.is_array())
    });
    d.allocate("bad", UID, &[("r", "mlx5-0")]);
    d.allocate("good", UID2, &[("r", "mlx5-1")]);
    let resp = d
        .kubelet
        .prepare(&[("default", "bad", UID), ("default", "good", UID2)])
        .unwrap();
    assert!(
        resp.claims[UID].error.contains("no uverbs node"),
        "{:?}",
        resp.claims[UID]
    );
    assert_eq!(resp.claims[UID2].error, "");
    let spec = fs::read_to_string(d.spec_file(UID2)).unwrap();
    assert!(
        !spec.contains("uverbs1") && !spec.contains("shadow"),
        "{spec}"
    );
}

/// A hostile client on dra.sock: 10,000 claims in one call get 10,000 entries (the ones beyond
/// the bound an error each, no API request for them); a request over the server's 1 MiB limit
/// is refused by gRPC; the driver keeps serving.
#[test]
fn huge_prepare_requests_are_bounded() {
    let d = Dra::start("dra-huge", PER_HCA);
    d.slice_where(|_| true);
    let uids: Vec<String> = (0..10_000)
        .map(|i| format!("00000000-0000-4000-8000-{i:012x}"))
        .collect();
    let claims: Vec<(&str, &str, &str)> = uids
        .iter()
        .map(|u| ("default", "nope", u.as_str()))
        .collect();
    let resp = d.kubelet.prepare(&claims).unwrap();
    assert_eq!(resp.claims.len(), 10_000);
    assert!(resp.claims[&uids[9_999]].error.contains("more than"));
    let fetched = d
        .api
        .requests()
        .iter()
        .filter(|r| r.path.contains("/resourceclaims/"))
        .count();
    assert!(fetched <= 256, "{fetched} claim fetches for one call");

    let long = "a".repeat(2 << 20);
    let err = d.kubelet.prepare(&[("default", long.as_str(), UID)]);
    assert!(err.is_err(), "a 2 MiB request is refused");
    d.allocate("job", UID, &[("r", "mlx5-0")]);
    assert_eq!(
        d.kubelet
            .prepare(&[("default", "job", UID)])
            .unwrap()
            .claims[UID]
            .error,
        ""
    );
}
