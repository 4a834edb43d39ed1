#!/usr/bin/env python3
"""Checks the deploy files for what the schemas cannot: drop-in names of the original and the
hardening we promise. Run by scripts/check-deploy.sh after the schema validation."""
import sys

import yaml


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def fail(msg):
    print(f"check-deploy: {msg}", file=sys.stderr)
    sys.exit(1)


def check_daemonset(path, plugin_dir, cdi=False):
    (ds,) = load(path)
    want = lambda cond, what: cond or fail(f"{path}: {what}")
    want(ds["kind"] == "DaemonSet" and ds["apiVersion"] == "apps/v1", "an apps/v1 DaemonSet")
    want(ds["metadata"]["name"] == "rdma-device-daemonset", "name rdma-device-daemonset")
    want(ds["spec"]["selector"]["matchLabels"] == {"name": "rdma-device-ds"}, "label name: rdma-device-ds")
    pod = ds["spec"]["template"]["spec"]
    want(pod["nodeSelector"] == {"node-role.kubernetes.io/jarvice-compute": ""}, "the jarvice-compute nodeSelector")
    tol = {(t["key"], t["operator"], t.get("effect")) for t in pod["tolerations"]}
    for t in [("CriticalAddonsOnly", "Exists", None), ("jarvice.com/rdma", "Exists", "NoSchedule"),
              ("node-role.kubernetes.io/jarvice-compute", "Exists", "NoSchedule")]:
        want(t in tol, f"toleration {t}")
    want(pod.get("priorityClassName") == "system-node-critical", "priorityClassName system-node-critical")
    want(pod.get("hostNetwork") is False, "no host network")
    want(pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", "pod seccomp RuntimeDefault")
    (ctr,) = pod["containers"]
    sc = ctr["securityContext"]
    want(sc.get("privileged") is False, "not privileged")
    want(sc.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    want(sc.get("readOnlyRootFilesystem") is True, "read-only root filesystem")
    want(sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], "all capabilities dropped")
    want(sc["seccompProfile"]["type"] == "RuntimeDefault", "container seccomp RuntimeDefault")
    for kind in ("requests", "limits"):
        want({"cpu", "memory"} <= set(ctr["resources"][kind]), f"cpu and memory {kind}")
    specs = [a for a in ctr["args"] if a.startswith("--resource=")]
    for probe in ("livenessProbe", "readinessProbe"):
        cmd = ctr[probe]["exec"]["command"]
        # The probe must check every resource's socket: the same --resource flags.
        want(cmd == ["/jarvice-rdma-plugin", "probe"] + specs, f"{probe} runs the binary's probe with the resources (no shell in scratch)")
    want(ctr["image"].startswith("jarvice/k8s-rdma-device:"), "image jarvice/k8s-rdma-device")
    vols = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    want(vols["device-plugins"] == {"path": plugin_dir, "type": "Directory"}, f"hostPath {plugin_dir}")
    want(mounts["device-plugins"]["mountPath"] == "/var/lib/kubelet/device-plugins", "plugin dir at the default path")
    for name, v in vols.items():
        want(v.get("type") in ("Directory", "CharDevice", "DirectoryOrCreate"), f"hostPath {name} typed (an untyped one becomes an empty dir)")
    want(vols["host-dev"]["path"] == "/dev" and mounts["host-dev"]["readOnly"], "host /dev read-only")
    if cdi:
        want(set(vols) == {"device-plugins", "host-dev", "cdi-specs"}, "host mounts: plugin dir, /dev, CDI spec dir")
        want(vols["cdi-specs"]["path"] == "/var/run/cdi" and mounts["cdi-specs"]["mountPath"] == "/var/run/cdi"
             and not mounts["cdi-specs"].get("readOnly"), "the CDI spec dir read-write at /var/run/cdi")
        want("--cdi" in ctr["args"], "--cdi with the spec dir mounted")
    else:
        want(set(vols) == {"device-plugins", "host-dev"}, "no host mounts beyond the plugin dir and /dev (no /sys: cgroupfs)")
        want(not specs and "--cdi" not in ctr["args"], "the drop-in: no --resource, no --cdi")
    want("--host-root=/host" in ctr["args"] and mounts["host-dev"]["mountPath"] == "/host/dev", "--host-root matches the mount")


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


check_daemonset("deploy/rdma-device.yml", "/var/lib/kubelet/device-plugins")
check_daemonset("deploy/rdma-device-k3s-legacy.yml", "/var/lib/rancher/k3s/agent/kubelet/device-plugins")
check_daemonset("deploy/rdma-device-cdi.yml", "/var/lib/kubelet/device-plugins", cdi=True)
check_pods("deploy/pod-example.yml")
print("check-deploy: drop-in names and hardening hold in every manifest")
