#!/usr/bin/env python3
"""Checks the deploy files for what the schemas cannot: drop-in names of the original and the
hardening we promise; for the DRA driver (rdma-dra.yml) also its kubelet paths, its RBAC, and its
CEL (the admission policy and the DeviceClass selectors, evaluated on sample requests and
devices); where metrics and Events are on (rdma-device-metrics.yml, rdma-dra.yml), their port,
flags and Events RBAC. Run by scripts/check-deploy.sh after the schema validation."""
import re
import sys

import yaml
from cel_expr_python import cel
from cel_expr_python.ext import ext_optional


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def fail(msg):
    print(f"check-deploy: {msg}", file=sys.stderr)
    sys.exit(1)


def wanter(path):
    return lambda cond, what: cond or fail(f"{path}: {what}")


def check_hardening(want, pod, ctr):
    """What every DaemonSet of ours promises, device plugin or DRA driver: the original's node
    selection and tolerations, and the hardening."""
    want(pod["nodeSelector"] == {"node-role.kubernetes.io/jarvice-compute": ""}, "the jarvice-compute nodeSelector")
    tol = {(t["key"], t["operator"], t.get("effect")) for t in pod["tolerations"]}
    for t in [("CriticalAddonsOnly", "Exists", None), ("jarvice.com/rdma", "Exists", "NoSchedule"),
              ("node-role.kubernetes.io/jarvice-compute", "Exists", "NoSchedule")]:
        want(t in tol, f"toleration {t}")
    want(pod.get("priorityClassName") == "system-node-critical", "priorityClassName system-node-critical")
    want(pod.get("hostNetwork") is False, "no host network")
    want(pod.get("hostPID") is False and pod.get("hostIPC") is False, "no host PID or IPC")
    want(pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", "pod seccomp RuntimeDefault")
    sc = ctr["securityContext"]
    want(sc.get("privileged") is False, "not privileged")
    want(sc.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    want(sc.get("readOnlyRootFilesystem") is True, "read-only root filesystem")
    want(sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], "all capabilities dropped")
    want(sc["seccompProfile"]["type"] == "RuntimeDefault", "container seccomp RuntimeDefault")
    for kind in ("requests", "limits"):
        want({"cpu", "memory"} <= set(ctr["resources"][kind]), f"cpu and memory {kind}")
    want(ctr["image"].startswith("jarvice/k8s-rdma-device:"), "image jarvice/k8s-rdma-device")
    vols = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    for name, v in vols.items():
        want(v.get("type") in ("Directory", "CharDevice", "DirectoryOrCreate"), f"hostPath {name} typed (an untyped one becomes an empty dir)")
    want(vols["host-dev"]["path"] == "/dev" and mounts["host-dev"]["readOnly"], "host /dev read-only")
    want("--host-root=/host" in ctr["args"] and mounts["host-dev"]["mountPath"] == "/host/dev", "--host-root matches the mount")
    return vols, mounts


# --- Metrics and Events (--metrics-address, --events) -----------------------------------------

# The port monitoring/pod-monitor.yml scrapes (by its name, "metrics").
METRICS_PORT = 9465
METRICS_ADDRESS = f"--metrics-address=$(POD_IP):{METRICS_PORT}"
# Where --events posts: the kubelet's own node Events live in default, and so do ours.
EVENTS_NAMESPACE = "default"
EVENT_RULES = {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
# Flags the exec probes must not get: they do not expand $(VAR), and `probe` neither serves
# metrics nor posts Events.
SERVE_ONLY = ("--metrics-address=", "--events")


def serve_only(arg):
    return arg.startswith(SERVE_ONLY)


def check_observed(want, pod, ctr, sa, role, binding, namespace):
    """Metrics on the pod IP at the port named metrics; Events with the node's name and a token
    that may create and patch Events in default and do nothing else."""
    args = ctr["args"]
    env = {e["name"]: e for e in ctr.get("env", [])}
    want(METRICS_ADDRESS in args, f"{METRICS_ADDRESS} (the pod IP, the port below)")
    want(env.get("POD_IP", {}).get("valueFrom") == {"fieldRef": {"fieldPath": "status.podIP"}},
         "POD_IP from the downward API status.podIP")
    want(ctr.get("ports") == [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
         f"one port: metrics, {METRICS_PORT}/TCP, no hostPort (what the PodMonitor scrapes)")
    want("--events" in args, "--events")
    want(env.get("NODE_NAME", {}).get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}},
         "NODE_NAME from the downward API spec.nodeName (the node the Events are about)")
    want(pod.get("serviceAccountName") == sa["metadata"]["name"] and pod.get("automountServiceAccountToken") is True,
         "the DaemonSet's service account, its token mounted (Events need the API)")
    for d in (role, binding):
        want(d["metadata"].get("namespace") == EVENTS_NAMESPACE, f"{d['kind']} in {EVENTS_NAMESPACE}, where the Events go")
    got = set()
    for r in role["rules"]:
        want(set(r) == {"apiGroups", "resources", "verbs"}, "Events Role rules of apiGroups, resources, verbs only")
        got |= {(g, res, v) for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    want(got == EVENT_RULES, f"Events Role: exactly {sorted(EVENT_RULES)}; extra {sorted(got - EVENT_RULES)}, "
         f"missing {sorted(EVENT_RULES - got)}")
    want(binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]},
         "RoleBinding to the Events Role")
    want(binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": namespace}],
         "RoleBinding to the DaemonSet's service account alone")
    for probe in ("livenessProbe", "readinessProbe"):
        want(not any(serve_only(a) for a in ctr[probe]["exec"]["command"]),
             f"{probe} without --metrics-address or --events (no $(VAR) in exec probes)")


def check_daemonset(path, plugin_dir, cdi=False, observed_in=None):
    """A device-plugin DaemonSet; with observed_in (a namespace) the variant with metrics and
    Events, whose file also holds the ServiceAccount and the Events Role and RoleBinding."""
    want = wanter(path)
    docs = load(path)
    if observed_in:
        objs = by_kind(want, docs, [("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
                                    ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("apps/v1", "DaemonSet")])
        (ds,), (sa,) = objs["DaemonSet"], objs["ServiceAccount"]
        for d in docs:
            want(d["metadata"].get("labels") == {"name": "rdma-device-ds"}, f"{d['kind']}: label name: rdma-device-ds")
        for d in (sa, ds):
            want(d["metadata"].get("namespace") == observed_in,
                 f"{d['kind']} in namespace {observed_in}, as rdma-device.yml (the RoleBinding names it)")
    else:
        want(len(docs) == 1, "one object, the DaemonSet")
        (ds,) = docs
    want(ds["kind"] == "DaemonSet" and ds["apiVersion"] == "apps/v1", "an apps/v1 DaemonSet")
    want(ds["metadata"]["name"] == "rdma-device-daemonset", "name rdma-device-daemonset")
    want(ds["spec"]["selector"]["matchLabels"] == {"name": "rdma-device-ds"}, "label name: rdma-device-ds")
    pod = ds["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    vols, mounts = check_hardening(want, pod, ctr)
    if observed_in:
        (role,), (binding,) = objs["Role"], objs["RoleBinding"]
        check_observed(want, pod, ctr, sa, role, binding, observed_in)
    else:
        want(pod.get("automountServiceAccountToken") is False, "no service-account token (the device plugin needs no API)")
        want("ports" not in ctr and not any(serve_only(a) for a in ctr["args"]),
             "no port, no --metrics-address, no --events (those are rdma-device-metrics.yml's)")
    specs = [a for a in ctr["args"] if a.startswith("--resource=")]
    for probe in ("livenessProbe", "readinessProbe"):
        cmd = ctr[probe]["exec"]["command"]
        # The probe must check every resource's socket: the same --resource flags.
        want(cmd == ["/jarvice-rdma-plugin", "probe"] + specs, f"{probe} runs the binary's probe with the resources (no shell in scratch)")
    want(vols["device-plugins"] == {"path": plugin_dir, "type": "Directory"}, f"hostPath {plugin_dir}")
    want(mounts["device-plugins"]["mountPath"] == "/var/lib/kubelet/device-plugins", "plugin dir at the default path")
    if cdi:
        want(set(vols) == {"device-plugins", "host-dev", "cdi-specs"}, "host mounts: plugin dir, /dev, CDI spec dir")
        want(vols["cdi-specs"]["path"] == "/var/run/cdi" and mounts["cdi-specs"]["mountPath"] == "/var/run/cdi"
             and not mounts["cdi-specs"].get("readOnly"), "the CDI spec dir read-write at /var/run/cdi")
        want("--cdi" in ctr["args"], "--cdi with the spec dir mounted")
    else:
        want(set(vols) == {"device-plugins", "host-dev"}, "no host mounts beyond the plugin dir and /dev (no /sys: cgroupfs)")
        want(not specs and "--cdi" not in ctr["args"], "the drop-in: no --resource, no --cdi")
        want(not any(a.startswith("--frontend") for a in ctr["args"]), "the device-plugin front-end (no --frontend)")


def check_pods(path):
    pods = load(path)
    names = [(p["metadata"]["name"], p["spec"]["containers"][0]["name"]) for p in pods]
    if names != [("ibpod", "ibpod-ctr"), ("ibpod2", "ibpod-ctr2")]:
        fail(f"{path}: pods ibpod/ibpod-ctr and ibpod2/ibpod-ctr2, not {names}")
    for p in pods:
        c = p["spec"]["containers"][0]
        if c["resources"]["limits"].get("jarvice.com/rdma") != 1:
            fail(f"{path}: {p['metadata']['name']} must request jarvice.com/rdma: 1")
        if "IPC_LOCK" not in c["securityContext"]["capabilities"]["add"]:
            fail(f"{path}: {p['metadata']['name']} needs IPC_LOCK")


# --- DRA -------------------------------------------------------------------------------------

# The binary's defaults (src/config.rs): what the DaemonSet relies on when it passes no flag.
DRA_DEFAULTS = {
    "driver-name": "rdma.jarvice.com",
    "kubelet-registry-dir": "/var/lib/kubelet/plugins_registry",
    "kubelet-plugins-dir": "/var/lib/kubelet/plugins",
    "cdi-dir": "/var/run/cdi",
}
DEFAULT_RESOURCE = "jarvice.com/rdma"
# DRA-CONTRACT section 6: what peers ship, and all the driver needs.
DRA_RULES = {("resource.k8s.io", "resourceclaims", "get"), ("", "nodes", "get")} | {
    ("resource.k8s.io", "resourceslices", v)
    for v in ("get", "list", "watch", "create", "update", "patch", "delete")}
# The attributes a device of ours carries (in the driver's domain), and the standard ones.
DRA_ATTRIBUTES = ("resource", "mode", "hca", "deviceID", "linkLayer", "portState", "rate", "firmware", "nodeGUID")
STANDARD_ATTRIBUTES = ("resource.kubernetes.io/pcieRoot", "resource.kubernetes.io/pciBusID",
                       "resource.kubernetes.io/numaNode")
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


def cel_env(*names):
    # Kubernetes' CEL has optionals (`m[?k]`, `o.?f`, `orValue`) on for admission policies.
    return cel.NewEnv(variables={n: cel.Type.DYN for n in names}, extensions=[ext_optional.ExtOptional()])


def cel_eval(want, env, expr, data, what):
    """The expression's value on `data`, or a CEL error as ("error", text)."""
    try:
        compiled = env.compile(expr)
    except RuntimeError as e:
        want(False, f"{what}: CEL does not compile: {e}")
    v = compiled.eval(data=data)
    if v.type() == cel.Type.ERROR:
        return ("error", str(v.value()))
    return v.plain_value()


def dra_flags(want, args):
    """--name=value flags as a dict (repeatable --resource as a list); the = form only, so that
    these rules read them as the binary does."""
    flags = {"resource": []}
    for a in args:
        want(a.startswith("--"), f"argument {a!r}: flags only")
        name, eq, value = a[2:].partition("=")
        if name == "resource":
            flags["resource"].append(value)
        else:
            want(name not in flags, f"--{name} given twice")
            flags[name] = value if eq else True
    return flags


def resources_of(flags):
    """(name, mode) of every resource the driver publishes."""
    specs = flags["resource"] or [DEFAULT_RESOURCE]
    out = []
    for spec in specs:
        name, *keys = spec.split(",")
        mode = dict(k.split("=", 1) for k in keys).get("mode", "shared")
        out.append((name, mode))
    return out


def by_kind(want, docs, expected):
    kinds = sorted((d["apiVersion"], d["kind"]) for d in docs)
    want(kinds == sorted(expected), f"exactly these objects: {sorted(expected)}, not {kinds}")
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def check_dra(path, namespace):
    """rdma-dra.yml. Returns its DeviceClasses by name and the driver, for the examples' checks."""
    want = wanter(path)
    docs = load(path)
    # No Namespace: `kubectl delete -f` would delete jarvice-daemonsets with everything in it.
    objs = by_kind(want, docs, [
        ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "ClusterRole"),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"),
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"),
        ("resource.k8s.io/v1", "DeviceClass"), ("resource.k8s.io/v1", "DeviceClass"), ("apps/v1", "DaemonSet")])
    (sa,), (role,), (crb,) = objs["ServiceAccount"], objs["ClusterRole"], objs["ClusterRoleBinding"]
    (vap,), (vapb,), (ds,) = objs["ValidatingAdmissionPolicy"], objs["ValidatingAdmissionPolicyBinding"], objs["DaemonSet"]
    classes = objs["DeviceClass"]
    for d in docs:
        want(d["metadata"].get("labels") == {"name": "rdma-dra-ds"}, f"{d['kind']} {d['metadata']['name']}: label name: rdma-dra-ds")
    for d in (sa, ds):
        want(d["metadata"].get("namespace") == namespace,
             f"{d['kind']} in namespace {namespace}, as rdma-device.yml (RBAC and the policy name it)")
    user = f"system:serviceaccount:{namespace}:{sa['metadata']['name']}"

    # The DaemonSet: the device plugin's hardening, the kubelet's DRA paths.
    want(ds["metadata"]["name"] == "rdma-dra-daemonset", "DaemonSet rdma-dra-daemonset (not the device plugin's name)")
    want(ds["spec"]["selector"]["matchLabels"] == {"name": "rdma-dra-ds"}
         and ds["spec"]["template"]["metadata"]["labels"] == {"name": "rdma-dra-ds"}, "pods labelled name: rdma-dra-ds")
    pod = ds["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    vols, mounts = check_hardening(want, pod, ctr)
    want(pod.get("serviceAccountName") == sa["metadata"]["name"] and pod.get("automountServiceAccountToken") is True,
         "the driver's service account, its token mounted (the driver needs the API)")
    flags = dra_flags(want, ctr["args"])
    want(flags.get("frontend") == "dra", "--frontend=dra")
    for f in ("kube-api", "kube-token-file", "kube-ca-file"):
        want(f not in flags, f"no --{f}: in-cluster config (the projected token names the node for the policy)")
    env = {e["name"]: e for e in ctr.get("env", [])}
    want(env.get("NODE_NAME", {}).get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}},
         "NODE_NAME from the downward API spec.nodeName")
    want(flags.get("node-name", "$(NODE_NAME)") == "$(NODE_NAME)", "--node-name, if given, is $(NODE_NAME)")
    driver, registry, plugins, cdi_dir = (flags.get(k, v) for k, v in DRA_DEFAULTS.items())
    want(set(vols) == {"plugins-registry", "plugin-dir", "host-dev", "cdi-specs"},
         "host mounts: the kubelet's plugin registry, the driver's dir, /dev, CDI spec dir (no /sys: cgroupfs)")
    for name in ("plugins-registry", "plugin-dir", "cdi-specs"):
        want(not mounts[name].get("readOnly"), f"{name} read-write")
        # The kubelet dials the dra.sock path the driver registers; the runtime reads the specs
        # where the driver wrote them: host and container paths must be one.
        want(vols[name]["path"] == mounts[name]["mountPath"], f"{name} at the same path in the container as on the host")
    want(vols["plugins-registry"] == {"path": registry, "type": "Directory"},
         f"the kubelet's {registry} (type Directory: the kubelet makes it; a kubelet elsewhere fails visibly)")
    want(vols["plugin-dir"]["path"] == f"{plugins}/{driver}",
         f"the driver's own dir {plugins}/{driver} (where dra.sock goes), not the other drivers' beside it")
    want(vols["cdi-specs"] == {"path": cdi_dir, "type": "DirectoryOrCreate"}, f"the CDI spec dir {cdi_dir}")
    want(mounts["host-dev"].get("recursiveReadOnly") == "IfPossible", "/dev recursively read-only (1.31+; DRA needs 1.34 anyway)")
    probe_args = [a for a in ctr["args"] if not a.startswith("--host-root=") and not serve_only(a)]
    for probe in ("livenessProbe", "readinessProbe"):
        cmd = ctr[probe]["exec"]["command"]
        # The probe finds the sockets through the same flags as the driver.
        want(cmd == ["/jarvice-rdma-plugin", "probe"] + probe_args,
             f"{probe} runs the binary's probe with the driver's flags but --host-root, --metrics-address "
             "and --events (no shell in scratch)")
    (events_role,), (events_binding,) = objs["Role"], objs["RoleBinding"]
    check_observed(want, pod, ctr, sa, events_role, events_binding, namespace)

    # RBAC: the minimal verbs, bound to the driver's service account only.
    got = set()
    for r in role["rules"]:
        want(set(r) == {"apiGroups", "resources", "verbs"}, "ClusterRole rules of apiGroups, resources, verbs only")
        got |= {(g, res, v) for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    want(got == DRA_RULES, f"ClusterRole: exactly {sorted(DRA_RULES)}; extra {sorted(got - DRA_RULES)}, missing {sorted(DRA_RULES - got)}")
    want(crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
         "ClusterRoleBinding to the ClusterRole")
    want(crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": namespace}],
         "ClusterRoleBinding to the driver's service account alone")

    check_policy(want, vap, vapb, user, driver)
    check_classes(want, classes, driver, resources_of(flags))
    return {c["metadata"]["name"]: c for c in classes}, driver


def check_policy(want, vap, vapb, user, driver):
    """The ValidatingAdmissionPolicy, run as the API server would on sample requests."""
    spec = vap["spec"]
    want(spec.get("failurePolicy") == "Fail", "the policy fails closed (failurePolicy: Fail)")
    covered = {(g, r, op) for rule in spec["matchConstraints"]["resourceRules"] for g in rule["apiGroups"]
               for r in rule["resources"] for op in rule["operations"] if rule.get("apiVersions") == ["*"]}
    for op in ("CREATE", "UPDATE", "DELETE"):
        want(("resource.k8s.io", "resourceslices", op) in covered, f"the policy matches {op} of resourceslices, every version")
    want(vapb["spec"].get("policyName") == vap["metadata"]["name"], "the binding names the policy")
    want("Deny" in vapb["spec"].get("validationActions", []), "the binding denies (validationActions: [Deny])")
    want(set(vapb["spec"]) <= {"policyName", "validationActions"}, "the binding narrows nothing (no matchResources, paramRef)")
    env = cel_env("request", "object", "oldObject", "variables")

    def slice_(node, drv=driver):
        s = {"driver": drv, "pool": {"name": node or "all", "generation": 1, "resourceSliceCount": 1}, "devices": []}
        if node:
            s["nodeName"] = node
        else:
            s["allNodes"] = True
        return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": "s"}, "spec": s}

    def admit(what, username, op, obj, old, node="n1"):
        extra = {NODE_NAME_EXTRA: [node]} if node else {}
        request = {"operation": op, "userInfo": {"username": username, "groups": [], "extra": extra}}
        data = {"request": request, "object": obj, "oldObject": old}
        for mc in spec.get("matchConditions", []):
            v = cel_eval(want, env, mc["expression"], data, f"matchCondition {mc['name']}")
            want(isinstance(v, bool), f"matchCondition {mc['name']} on {what}: {v}")
            if not v:
                return True
        variables = {}
        for var in spec.get("variables", []):
            variables[var["name"]] = cel_eval(want, env, var["expression"], {**data, "variables": variables},
                                              f"variable {var['name']}")
            want(not isinstance(variables[var["name"]], tuple), f"variable {var['name']} on {what}: {variables[var['name']]}")
        data["variables"] = variables
        for val in spec["validations"]:
            v = cel_eval(want, env, val["expression"], data, f"validation {val['expression']!r}")
            want(isinstance(v, bool), f"validation {val['expression']!r} on {what}: {v} (a clean false, not an error)")
            if not v:
                if "messageExpression" in val:
                    m = cel_eval(want, env, val["messageExpression"], data, "messageExpression")
                    want(isinstance(m, str), f"messageExpression on {what}: {m}")
                return False
        return True

    other = "system:serviceaccount:kube-system:other"
    cases = [
        ("its own node's slice, created", user, "CREATE", slice_("n1"), None, "n1", True),
        ("its own node's slice, updated", user, "UPDATE", slice_("n1"), slice_("n1"), "n1", True),
        ("its own node's slice, deleted", user, "DELETE", None, slice_("n1"), "n1", True),
        ("another node's slice, created", user, "CREATE", slice_("n2"), None, "n1", False),
        ("another node's slice, updated", user, "UPDATE", slice_("n2"), slice_("n2"), "n1", False),
        ("another node's slice moved to its own", user, "UPDATE", slice_("n1"), slice_("n2"), "n1", False),
        ("another node's slice, deleted", user, "DELETE", None, slice_("n2"), "n1", False),
        ("a slice for all nodes", user, "CREATE", slice_(None), None, "n1", False),
        ("another driver's slice on its node", user, "CREATE", slice_("n1", "other.example.com"), None, "n1", False),
        ("another driver's slice, deleted", user, "DELETE", None, slice_("n1", "other.example.com"), "n1", False),
        ("a token naming no node", user, "CREATE", slice_("n1"), None, None, False),
        ("another user on another node's slice", other, "CREATE", slice_("n2", "other.example.com"), None, "n1", True),
        ("the kubelet deleting its slices", "system:node:n1", "DELETE", None, slice_("n1"), None, True),
    ]
    for what, username, op, obj, old, node, allowed in cases:
        want(admit(what, username, op, obj, old, node) == allowed,
             f"the admission policy must {'allow' if allowed else 'deny'} {what} ({username})")


def check_classes(want, classes, driver, resources):
    """DeviceClass selectors on sample devices of every resource the DaemonSet publishes, and on
    a device of another driver with the same attributes."""
    env = cel_env("device")
    names = [c["metadata"]["name"] for c in classes]

    def device(drv, name, mode):
        attrs = {"resource": name, "mode": mode, "hca": "mlx5_0", "linkLayer": "InfiniBand", "portState": "ACTIVE",
                 "rate": "200 Gb/sec (4X HDR)", "firmware": "20.40.1000", "nodeGUID": "0c42:a103:0016:0a0e"}
        std = {"pcieRoot": "pci0000:00", "pciBusID": "0000:3b:00.0", "numaNode": 0}
        return {"driver": drv, "attributes": {driver: attrs, "resource.kubernetes.io": std} if drv == driver
                else {drv: attrs, driver: attrs, "resource.kubernetes.io": std}, "capacity": {}, "allowMultipleAllocations": False}

    mapped = {}
    for c in classes:
        cname = c["metadata"]["name"]
        sels = [s["cel"]["expression"] for s in c["spec"]["selectors"]]
        want(sels, f"DeviceClass {cname}: selectors")

        def selects(dev):
            for expr in sels:
                v = cel_eval(want, env, expr, {"device": dev}, f"DeviceClass {cname}")
                want(isinstance(v, bool), f"DeviceClass {cname} on {dev['driver']} device: {v} (a bool, not an error)")
                if not v:
                    return False
            return True

        picked = [(n, m) for n, m in resources if selects(device(driver, n, m))]
        want(picked, f"DeviceClass {cname} selects a device of a resource the DaemonSet publishes ({resources})")
        want(len({m for _, m in picked}) == 1, f"DeviceClass {cname} selects one mode, not {picked}")
        want(not any(selects(device("other.example.com", n, m)) for n, m in resources),
             f"DeviceClass {cname} selects only {driver}'s devices (device.driver)")
        ext = c["spec"].get("extendedResourceName")
        if ext is not None:
            # KEP-5004: `limits: {NAME: 1}` is served by this class; it must be that resource's
            # devices, shared ones (one unit = one whole device granting every HCA).
            want(picked == [(ext, "shared")], f"DeviceClass {cname}: extendedResourceName {ext} selects exactly {ext}'s shared devices, not {picked}")
            want(ext not in mapped, f"{ext} mapped by {mapped.get(ext)} and {cname}: the newest class would win")
            mapped[ext] = cname
    want(mapped.get(DEFAULT_RESOURCE) == driver, f"DeviceClass {driver} maps the drop-in's {DEFAULT_RESOURCE} (extendedResourceName)")
    want(any(m == "per-hca" for _, m in resources) and "rdma-hca.jarvice.com" in names,
         "per-HCA devices published, and the DeviceClass rdma-hca.jarvice.com for them")


def check_dra_pod(path, classes, seen):
    """dra-pod-example.yml: the drop-in pod, unchanged but for its name (KEP-5004)."""
    want = wanter(path)
    (p,) = load(path)
    name = p["metadata"]["name"]
    want(p["kind"] == "Pod" and "resourceClaims" not in p["spec"], f"{name}: a Pod asking by extended resource, no claims")
    mapped = {c["spec"].get("extendedResourceName") for c in classes.values()}
    for c in p["spec"]["containers"]:
        want(c["resources"] == {"limits": {DEFAULT_RESOURCE: 1}}, f"{name}: only limits {{{DEFAULT_RESOURCE}: 1}}")
        want(DEFAULT_RESOURCE in mapped, f"{DEFAULT_RESOURCE} mapped by a DeviceClass of rdma-dra.yml")
        want("IPC_LOCK" in c["securityContext"]["capabilities"]["add"], f"{name} needs IPC_LOCK")
    want(name not in seen, f"pod {name} named like another example's")
    seen.add(name)


def check_dra_claims(path, classes, driver, seen):
    """dra-claim-example.yml: templates on the DRA classes, pods that use every claim they name."""
    want = wanter(path)
    docs = load(path)
    want({d["kind"] for d in docs} == {"ResourceClaimTemplate", "Pod"}, "ResourceClaimTemplates and Pods")
    known = {f"{driver}/{a}" for a in DRA_ATTRIBUTES} | set(STANDARD_ATTRIBUTES)
    templates = {}
    for t in (d for d in docs if d["kind"] == "ResourceClaimTemplate"):
        devs = t["spec"]["spec"]["devices"]
        reqs = {r["name"]: r for r in devs["requests"]}
        for rname, r in reqs.items():
            cls = r["exactly"]["deviceClassName"]
            want(cls in classes, f"request {rname}: DeviceClass {cls} is not one of rdma-dra.yml's {sorted(classes)}")
        for c in devs.get("constraints", []):
            want(set(c["requests"]) <= set(reqs), f"constraint on requests {c['requests']} of the template")
            want(c.get("matchAttribute") in known, f"matchAttribute {c.get('matchAttribute')}: one the driver publishes")
        templates[t["metadata"]["name"]] = t
    for p in (d for d in docs if d["kind"] == "Pod"):
        name = p["metadata"]["name"]
        claims = {c["name"]: c for c in p["spec"].get("resourceClaims", [])}
        want(claims, f"{name}: spec.resourceClaims")
        for c in claims.values():
            want(c.get("resourceClaimTemplateName") in templates, f"{name}: claim {c['name']} from a template of this file")
        used = set()
        for c in p["spec"]["containers"]:
            refs = {r["name"] for r in c.get("resources", {}).get("claims", [])}
            want(refs <= set(claims), f"{name}/{c['name']}: resources.claims {sorted(refs)} among spec.resourceClaims")
            used |= refs
            want("IPC_LOCK" in c["securityContext"]["capabilities"]["add"], f"{name} needs IPC_LOCK")
        want(used == set(claims), f"{name}: every claim used by a container (an unused one only holds devices)")
        want(name not in seen, f"pod {name} named like another example's")
        seen.add(name)


def namespace_of(path):
    """The namespace rdma-device.yml's header applies it in (the DRA objects must match)."""
    with open(path, encoding="utf-8") as f:
        m = re.search(r"kubectl -n (\S+) apply -f deploy/rdma-device\.yml", f.read())
    if not m:
        fail(f"{path}: no `kubectl -n NAMESPACE apply` line to take the namespace from")
    return m.group(1)


ns = namespace_of("deploy/rdma-device.yml")
check_daemonset("deploy/rdma-device.yml", "/var/lib/kubelet/device-plugins")
check_daemonset("deploy/rdma-device-k3s-legacy.yml", "/var/lib/rancher/k3s/agent/kubelet/device-plugins")
check_daemonset("deploy/rdma-device-cdi.yml", "/var/lib/kubelet/device-plugins", cdi=True)
check_daemonset("deploy/rdma-device-metrics.yml", "/var/lib/kubelet/device-plugins", observed_in=ns)
check_pods("deploy/pod-example.yml")
print("check-deploy: drop-in names and hardening hold in every device-plugin manifest; "
      "metrics and Events (port, flags, Events RBAC) in rdma-device-metrics.yml")
dra_classes, dra_driver = check_dra("deploy/rdma-dra.yml", ns)
pod_names = {"ibpod", "ibpod2"}
check_dra_pod("deploy/dra-pod-example.yml", dra_classes, pod_names)
check_dra_claims("deploy/dra-claim-example.yml", dra_classes, dra_driver, pod_names)
print("check-deploy: DRA driver: hardening, kubelet paths, minimal RBAC, admission policy and DeviceClass CEL, "
      "metrics and Events hold")
