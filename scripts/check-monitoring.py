#!/usr/bin/env python3
"""Checks deploy/monitoring/ offline, with promtool (PATH; scripts/check-deploy.sh puts Debian's
there): the PrometheusRule's rules parse and pass their unit tests (alerts-test.yml), every alert
is tested both firing and quiet, every PromQL of the Grafana dashboard parses, the dashboard is
valid JSON with unique panel ids, and the PodMonitor scrapes the DaemonSets that serve metrics.
Metric names are checked against what the binary exposes (METRICS below).
Run by scripts/check-deploy.sh after check-deploy.py."""
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

MON = Path("deploy/monitoring")
# What the binary exposes (--metrics-address), read from the renderer's source: a name used in a
# query and not there is a typo. Histograms add their _bucket/_sum/_count series.
RENDER = Path("src/metrics/render.rs").read_text()
HISTOGRAMS = {"jarvice_rdma_request_duration_seconds"}
METRICS = set(re.findall(r'"(jarvice_rdma_[a-z_]+)"', RENDER)) - HISTOGRAMS | {
    f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
assert len(METRICS) > 20 and "jarvice_rdma_port_up" in METRICS, "cannot read the metric names"
# The alerts operators were promised; each needs a runbook naming diagnose.
ALERTS = {"RdmaPortDown", "RdmaPluginNotRegistered", "RdmaAllocatableZeroWhilePodsWait"}
# PodMonitor (monitoring.coreos.com/v1) fields, a subset of the CRD's: a misspelt one would be
# dropped by the API server without a word (promtool checks the PrometheusRule's spec).
POD_MONITOR_FIELDS = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels",
                      "sampleLimit", "targetLimit", "labelLimit", "attachMetadata"}
ENDPOINT_FIELDS = {"port", "portNumber", "path", "scheme", "params", "interval", "scrapeTimeout", "honorLabels",
                   "honorTimestamps", "relabelings", "metricRelabelings", "tlsConfig", "authorization",
                   "followRedirects", "enableHttp2", "filterRunning"}
RELABEL_FIELDS = {"action", "sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement"}
# Grafana's variables, as they would expand in a query: $node is a multi-value regex.
GRAFANA_VARS = {"node": ".*", "__rate_interval": "1m", "__interval": "30s", "__range": "1h"}


def fail(msg):
    print(f"check-monitoring: {msg}", file=sys.stderr)
    sys.exit(1)


def wanter(path):
    return lambda cond, what: cond or fail(f"{path}: {what}")


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def promtool(*args):
    """promtool's output; its failure fails the check with that output."""
    r = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        fail(f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}")
    return r.stdout


def metric_names(expr):
    return set(re.findall(r"\bjarvice_rdma_[a-z_]+", expr))


def selects(selector, labels):
    """A Kubernetes label selector (matchLabels, matchExpressions) on a pod's labels."""
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok &= {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
               "Exists": key in labels, "DoesNotExist": key not in labels}[op]
    return ok


def check_pod_monitor(path):
    """Returns the job name it gives the targets."""
    want = wanter(path)
    (pm,) = load(path)
    want(pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor", "a monitoring.coreos.com/v1 PodMonitor")
    want(set(pm["spec"]) <= POD_MONITOR_FIELDS, f"spec fields {sorted(set(pm['spec']) - POD_MONITOR_FIELDS)} unknown")
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    want(set(ep) <= ENDPOINT_FIELDS, f"podMetricsEndpoints fields {sorted(set(ep) - ENDPOINT_FIELDS)} unknown")
    for r in ep.get("relabelings", []):
        want(set(r) <= RELABEL_FIELDS, f"relabeling fields {sorted(set(r) - RELABEL_FIELDS)} unknown")
    want(ep.get("port") == "metrics" and ep.get("path", "/metrics") == "/metrics", "scrapes the port named metrics at /metrics")
    relabel = ep.get("relabelings", [])
    want({"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in relabel,
         "relabels __meta_kubernetes_pod_node_name to node (the alerts join on it)")
    jobs = [r.get("replacement") for r in relabel if r.get("targetLabel") == "job" and "sourceLabels" not in r]
    want(len(jobs) == 1 and jobs[0], "one fixed job name (relabeling targetLabel: job, replacement)")
    # Every DaemonSet that serves metrics is selected, with the port it declares.
    served = 0
    for f in sorted(Path("deploy").glob("*.yml")):
        for d in load(f):
            if d.get("kind") != "DaemonSet":
                continue
            tmpl = d["spec"]["template"]
            ports = [p for c in tmpl["spec"]["containers"] for p in c.get("ports", [])]
            if not any(p.get("name") == "metrics" for p in ports):
                continue
            served += 1
            want(selects(pm["spec"]["selector"], tmpl["metadata"]["labels"]),
                 f"the selector picks {f}'s pods ({tmpl['metadata']['labels']})")
            want(d["metadata"].get("namespace", "jarvice-daemonsets") == "jarvice-daemonsets",
                 f"{f}'s DaemonSet in jarvice-daemonsets, where the PodMonitor is applied")
    want(served >= 2, f"DaemonSets with a metrics port: the device plugin's and the DRA driver's, not {served}")
    return jobs[0]


def check_rules(path, test_path, job, tmp):
    want = wanter(path)
    (pr,) = load(path)
    want(pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["kind"] == "PrometheusRule", "a monitoring.coreos.com/v1 PrometheusRule")
    rules = [r for g in pr["spec"]["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    want(ALERTS <= set(alerts), f"alerts {sorted(ALERTS)}; missing {sorted(ALERTS - set(alerts))}")
    for name, r in alerts.items():
        want(r.get("labels", {}).get("severity") in ("critical", "warning", "info"), f"{name}: a severity label")
        a = r.get("annotations", {})
        want({"summary", "description", "runbook"} <= set(a), f"{name}: summary, description and runbook annotations")
        want("jarvice-rdma-plugin diagnose" in a["runbook"], f"{name}: the runbook runs jarvice-rdma-plugin diagnose")
        check_expr(want, name, r["expr"], job)
    # promtool reads plain rule files: the spec alone, beside a copy of the tests.
    rules_file = tmp / "alerts.rules.yml"
    rules_file.write_text(yaml.safe_dump(pr["spec"], sort_keys=False), encoding="utf-8")
    promtool("check", "rules", str(rules_file))
    (tests,) = load(test_path)
    want(tests.get("rule_files") == [rules_file.name], f"{test_path}: rule_files [{rules_file.name}]")
    fired, quiet = set(), set()
    for t in tests["tests"]:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    for name in alerts:
        want(name in fired and name in quiet, f"{test_path} tests {name} firing and quiet")
    shutil.copy(test_path, tmp / test_path.name)
    promtool("test", "rules", str(tmp / test_path.name))
    return len(alerts)


def check_expr(want, where, expr, job):
    unknown = metric_names(expr) - METRICS
    want(not unknown, f"{where}: metrics the plugin does not expose: {sorted(unknown)}")
    for j in re.findall(r'\bjob\s*=~?\s*"([^"]*)"', expr):
        want(j == job, f"{where}: job {j!r}, not the PodMonitor's {job!r}")


def unique_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        fail(f"{MON / 'dashboard.json'}: duplicate keys {sorted(dup)}")
    return dict(pairs)


def expand(want, where, expr):
    """The query as Prometheus would get it from Grafana."""
    want(not re.search(r'node\s*(=|!=)\s*"\$\{?node', expr), f"{where}: $node is multi-value: match it with =~")

    def sub(m):
        name = m.group(1) or m.group(2)
        want(name in GRAFANA_VARS, f"{where}: unknown variable ${name}")
        return GRAFANA_VARS[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def check_dashboard(path, job, tmp):
    want = wanter(path)
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        fail(f"{path}: not JSON: {e}")
    want(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36, "schemaVersion 36 or later")
    want(dash.get("uid") and dash.get("title"), "a uid and a title")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource", {})
    want(ds.get("type") == "datasource" and ds.get("query") == "prometheus", "a datasource variable of type prometheus")
    node = variables.get("node", {})
    q = node.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    want(q == "label_values(jarvice_rdma_build_info, node)" and node.get("multi") and node.get("includeAll")
         and node.get("allValue") == ".*", "a multi-value node variable from label_values(jarvice_rdma_build_info, node), All = .*")
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # a collapsed row's panels
    ids = [p.get("id") for p in panels]
    want(all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), f"unique integer panel ids, not {ids}")
    cells = {}
    rules, queried = [], set()
    for p in panels:
        g = p["gridPos"]
        want(g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {p['id']} within the 24 columns")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                want((x, y) not in cells, f"panels {cells.get((x, y))} and {p['id']} overlap")
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        want(p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, f"panel {p['id']}: datasource ${{datasource}}")
        targets = p.get("targets", [])
        want(targets, f"panel {p['id']} ({p.get('title')}): queries")
        refs = [t["refId"] for t in targets]
        want(len(refs) == len(set(refs)), f"panel {p['id']}: unique refIds")
        for t in targets:
            where = f"panel {p['id']} ({p['title']}) query {t['refId']}"
            want(t.get("datasource", p["datasource"]) == p["datasource"], f"{where}: the panel's datasource")
            check_expr(want, where, t["expr"], job)
            queried |= metric_names(t["expr"])
            rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId']}", "expr": expand(want, where, t["expr"])})
    rules_file = tmp / "dashboard.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False),
                          encoding="utf-8")
    promtool("check", "rules", str(rules_file))
    missing = METRICS - queried
    want(not missing, f"no panel shows {sorted(missing)}")
    return len(panels), len(rules)


def main():
    version = promtool("--version").splitlines()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        job = check_pod_monitor(MON / "pod-monitor.yml")
        n_alerts = check_rules(MON / "alerts.yml", MON / "alerts-test.yml", job, tmp)
        n_panels, n_queries = check_dashboard(MON / "dashboard.json", job, tmp)
    print(f"check-monitoring: {version}: {n_alerts} alerts parse and pass alerts-test.yml (firing and quiet); "
          f"{n_queries} dashboard queries in {n_panels} panels parse; the PodMonitor scrapes every metrics port")


main()
