//! A [`Snapshot`] in the Prometheus text format (0.0.4), through the `prometheus` crate's
//! encoder (escaping, `+Inf` buckets, number formatting). Names follow Prometheus' conventions:
//! the `jarvice_rdma_` prefix, base units (seconds, bytes per second), `_total` on counters,
//! enum-like states as numbers beside an `_info` series with the names as labels.

use prometheus::proto::{Bucket, Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::TextEncoder;

use crate::observe::{Snapshot, LATENCY_BUCKETS};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One family being built: its samples as label sets and values.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    metrics: Vec<Metric>,
}

impl Family {
    fn new(name: &'static str, kind: MetricType, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            metrics: Vec::new(),
        }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut m = Metric::from_label(pairs(labels));
        match self.kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.metrics.push(m);
    }

    fn push(self, out: &mut Vec<MetricFamily>) {
        // The encoder refuses a family without samples (a counter nothing has bumped yet).
        if self.metrics.is_empty() {
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(self.name.to_string());
        f.set_help(self.help.to_string());
        f.set_field_type(self.kind);
        f.set_metric(self.metrics);
        out.push(f);
    }
}

fn pairs(labels: &[(&str, &str)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(k, v)| {
            let mut p = LabelPair::default();
            p.set_name(k.to_string());
            p.set_value(v.to_string());
            p
        })
        .collect()
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The counters [`crate::observe::Observer`] keeps, by their short name: the exposed name and
/// help.
const COUNTERS: [(&str, &str, &str); 9] = [
    (
        "registrations",
        "jarvice_rdma_registrations_total",
        "Registrations with the kubelet, by resource and result (accepted, failed).",
    ),
    (
        "kubelet_restarts",
        "jarvice_rdma_kubelet_restarts_total",
        "New kubelets seen (a new kubelet.sock, or a DRA registration after the first).",
    ),
    (
        "health_transitions",
        "jarvice_rdma_health_transitions_total",
        "Changes of a resource's health, by the health it changed to.",
    ),
    (
        "allocated_devices",
        "jarvice_rdma_allocated_devices_total",
        "Devices granted by Allocate or NodePrepareResources.",
    ),
    (
        "requests",
        "jarvice_rdma_requests_total",
        "kubelet calls answered, by RPC and gRPC status code.",
    ),
    (
        "claims",
        "jarvice_rdma_claims_total",
        "Claims in NodePrepareResources/NodeUnprepareResources calls, by result (ok, error).",
    ),
    (
        "events",
        "jarvice_rdma_events_total",
        "Kubernetes Events, by reason and result (created, patched, dropped, failed).",
    ),
    (
        "refused_scrapes",
        "jarvice_rdma_metrics_connections_rejected_total",
        "Metrics connections closed unanswered, by why (busy, timeout, too_large, bad_request).",
    ),
    (
        "slice_writes",
        "jarvice_rdma_resourceslice_writes_total",
        "ResourceSlice writes to the API server, by result (ok, error).",
    ),
];

/// The whole exposition of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut out = Vec::new();
    let mut info = Family::new(
        "jarvice_rdma_build_info",
        MetricType::GAUGE,
        "Always 1: the plugin's version and front-end.",
    );
    info.sample(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("frontend", s.frontend),
        ],
        1.0,
    );
    info.push(&mut out);
    ports(s, &mut out);
    resources(s, &mut out);
    for (short, name, help) in COUNTERS {
        let mut f = Family::new(name, MetricType::COUNTER, help);
        for ((n, labels), v) in s.counters.range((short, Vec::new())..) {
            if *n != short {
                break;
            }
            let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            f.sample(&l, *v as f64);
        }
        f.push(&mut out);
    }
    latency(s, &mut out);
    let mut buf = String::new();
    // Only fails for a family without samples, which `push` leaves out.
    if let Err(e) = TextEncoder::new().encode_utf8(&out, &mut buf) {
        log::warn!("metrics: cannot encode: {e}");
    }
    buf
}

/// Per HCA and port: states, link layer, rate, whether a resource grants the HCA.
fn ports(s: &Snapshot, out: &mut Vec<MetricFamily>) {
    let mut up = Family::new(
        "jarvice_rdma_port_up",
        MetricType::GAUGE,
        "1 when the port is ACTIVE and LinkUp (what verbs programs need), else 0.",
    );
    let mut state = Family::new(
        "jarvice_rdma_port_state",
        MetricType::GAUGE,
        "The port's logical state number (1 DOWN, 2 INIT, 3 ARMED, 4 ACTIVE, 5 ACTIVE_DEFER).",
    );
    let mut phys = Family::new(
        "jarvice_rdma_port_phys_state",
        MetricType::GAUGE,
        "The port's physical state number (2 Polling, 3 Disabled, 5 LinkUp, ...).",
    );
    let mut info = Family::new(
        "jarvice_rdma_port_info",
        MetricType::GAUGE,
        "Always 1: the port's link layer and state names.",
    );
    let mut rate = Family::new(
        "jarvice_rdma_port_rate_bytes_per_second",
        MetricType::GAUGE,
        "The port's rate as sysfs reports it.",
    );
    let mut hca_info = Family::new(
        "jarvice_rdma_hca_info",
        MetricType::GAUGE,
        "Always 1: the HCA's PCI address, NUMA node and firmware.",
    );
    let mut granted = Family::new(
        "jarvice_rdma_hca_granted",
        MetricType::GAUGE,
        "1 when the resource grants the HCA (selected, with its device nodes), else 0.",
    );
    let mut refused = Family::new(
        "jarvice_rdma_refused_device_nodes",
        MetricType::GAUGE,
        "Device nodes that look like ours but failed verification (never granted).",
    );
    if let Some(host) = &s.host {
        for hca in &host.hcas.list {
            let numa = hca.numa_node().map(|n| n.to_string()).unwrap_or_default();
            let pci = hca.pci.as_ref().map_or("", |p| p.address.as_str());
            hca_info.sample(
                &[
                    ("hca", &hca.name),
                    ("pci_address", pci),
                    ("numa_node", &numa),
                    ("fw_ver", hca.fw_ver.as_deref().unwrap_or("")),
                ],
                1.0,
            );
            for (name, r) in &s.resources {
                granted.sample(
                    &[("hca", &hca.name), ("resource", name)],
                    flag(r.granted.contains(&hca.name)),
                );
            }
            for p in &hca.ports {
                let port = p.number.to_string();
                let l = [("hca", hca.name.as_str()), ("port", port.as_str())];
                up.sample(&l, flag(p.is_up()));
                if let Some(st) = &p.state {
                    state.sample(&l, f64::from(st.code));
                }
                if let Some(ph) = &p.phys_state {
                    phys.sample(&l, f64::from(ph.code));
                }
                let text = |x: &Option<crate::host::sysfs::Status>| {
                    x.as_ref().map(|x| x.text.clone()).unwrap_or_default()
                };
                let (st, ph) = (text(&p.state), text(&p.phys_state));
                let layer = p.link_layer.as_ref().map_or("", |x| x.as_str());
                info.sample(
                    &[
                        ("hca", &hca.name),
                        ("port", &port),
                        ("link_layer", layer),
                        ("state", &st),
                        ("phys_state", &ph),
                    ],
                    1.0,
                );
                if let Some(bps) = p
                    .rate
                    .as_deref()
                    .and_then(crate::observe::rate_bytes_per_second)
                {
                    rate.sample(&l, bps);
                }
            }
        }
        refused.sample(&[], host.nodes.refused.len() as f64);
    }
    for f in [up, state, phys, info, rate, hca_info, granted, refused] {
        f.push(out);
    }
}

/// Per resource: devices advertised, healthy, allocated; registered; serving.
fn resources(s: &Snapshot, out: &mut Vec<MetricFamily>) {
    let mut devices = Family::new(
        "jarvice_rdma_resource_devices",
        MetricType::GAUGE,
        "Devices advertised to the kubelet (device plugin) or published (DRA).",
    );
    let mut healthy = Family::new(
        "jarvice_rdma_resource_devices_healthy",
        MetricType::GAUGE,
        "Advertised devices that are Healthy.",
    );
    let mut allocated = Family::new(
        "jarvice_rdma_resource_devices_allocated",
        MetricType::GAUGE,
        "Devices held by prepared claims (DRA; the device-plugin API never says when a pod ends).",
    );
    let mut registered = Family::new(
        "jarvice_rdma_registered",
        MetricType::GAUGE,
        "1 when the kubelet accepted the registration of what is served now, else 0.",
    );
    let mut serving = Family::new(
        "jarvice_rdma_serving",
        MetricType::GAUGE,
        "1 while the resource's gRPC server runs, 0 while it rests (no kubelet).",
    );
    let mut streams = Family::new(
        "jarvice_rdma_health_streams",
        MetricType::GAUGE,
        "Streams the kubelet holds open to hear of devices and health (ListAndWatch; DRA: the health stream).",
    );
    for (name, r) in &s.resources {
        let l = [("resource", name.as_str())];
        streams.sample(&l, r.streams as f64);
        devices.sample(&l, r.devices as f64);
        healthy.sample(&l, r.healthy_devices as f64);
        if let Some(a) = r.allocated {
            allocated.sample(&l, a as f64);
        }
        registered.sample(&l, flag(r.registered));
        serving.sample(&l, flag(r.serving));
    }
    for f in [devices, healthy, allocated, registered, serving, streams] {
        f.push(out);
    }
}

fn latency(s: &Snapshot, out: &mut Vec<MetricFamily>) {
    let mut f = MetricFamily::default();
    f.set_name("jarvice_rdma_request_duration_seconds".to_string());
    f.set_help("Time to answer a kubelet call, by RPC.".to_string());
    f.set_field_type(MetricType::HISTOGRAM);
    let mut metrics = Vec::new();
    for (rpc, h) in &s.latency {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(h.buckets)
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut hist = prometheus::proto::Histogram::default();
        hist.set_bucket(buckets);
        hist.set_sample_count(h.count);
        hist.set_sample_sum(h.sum);
        let mut m = Metric::from_label(pairs(&[("rpc", rpc)]));
        m.set_histogram(hist);
        metrics.push(m);
    }
    if !metrics.is_empty() {
        f.set_metric(metrics);
        out.push(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{Observer, ResourceView};
    use std::time::Duration;

    #[test]
    fn counters_histograms_and_resources_render() {
        let o = Observer::new("device-plugin", &["jarvice.com/rdma".into()]);
        o.resource_read(
            "jarvice.com/rdma",
            ResourceView {
                devices: 3,
                healthy_devices: 2,
                healthy: Some(true),
                ..ResourceView::default()
            },
        );
        o.request("Allocate", "OK", Duration::from_micros(700));
        o.request("Allocate", "InvalidArgument", Duration::from_secs(100));
        let text = render(&o.snapshot());
        for line in [
            "jarvice_rdma_resource_devices{resource=\"jarvice.com/rdma\"} 3",
            "jarvice_rdma_resource_devices_healthy{resource=\"jarvice.com/rdma\"} 2",
            "jarvice_rdma_requests_total{rpc=\"Allocate\",code=\"OK\"} 1",
            "jarvice_rdma_request_duration_seconds_bucket{rpc=\"Allocate\",le=\"0.001\"} 1",
            "jarvice_rdma_request_duration_seconds_bucket{rpc=\"Allocate\",le=\"45\"} 1",
            "jarvice_rdma_request_duration_seconds_bucket{rpc=\"Allocate\",le=\"+Inf\"} 2",
            "jarvice_rdma_request_duration_seconds_count{rpc=\"Allocate\"} 2",
            "# TYPE jarvice_rdma_requests_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Nothing bumped, nothing shown (and no empty family that the encoder would refuse).
        assert!(!text.contains("jarvice_rdma_events_total"));
        assert!(!text.contains("jarvice_rdma_resource_devices_allocated"));
    }
}
