#!/usr/bin/env python3
"""Checks the multi-arch OCI archive written by `manifest.sh --oci-archive`: an index with
amd64, ppc64le and arm64; each image one layer holding one file, /jarvice-rdma-plugin, identical to
out/jarvice-rdma-plugin-<arch>; the right architecture and the entrypoint in its config."""
import hashlib
import io
import json
import sys
import tarfile

INDEX = "application/vnd.oci.image.index.v1+json"
WANT = {"amd64": "x86_64", "ppc64le": "ppc64le", "arm64": "aarch64"}


def fail(msg):
    print(f"check-images: {msg}", file=sys.stderr)
    sys.exit(1)


def main(archive):
    with tarfile.open(archive) as tar:
        def blob(digest):
            algo, hexdigest = digest.split(":", 1)
            data = tar.extractfile(f"blobs/{algo}/{hexdigest}").read()
            if hashlib.sha256(data).hexdigest() != hexdigest:
                fail(f"blob {digest} does not match its digest")
            return data

        top = json.loads(tar.extractfile("index.json").read())
        index = top
        if top["manifests"][0].get("mediaType") == INDEX:
            index = json.loads(blob(top["manifests"][0]["digest"]))
        arches = sorted(m["platform"]["architecture"] for m in index["manifests"])
        if arches != sorted(WANT):
            fail(f"manifest list holds {arches}, want {sorted(WANT)}")
        for m in index["manifests"]:
            oci_arch = m["platform"]["architecture"]
            manifest = json.loads(blob(m["digest"]))
            config = json.loads(blob(manifest["config"]["digest"]))
            if config["architecture"] != oci_arch or config["os"] != "linux":
                fail(f"{oci_arch}: config says {config['os']}/{config['architecture']}")
            entry = config["config"].get("Entrypoint")
            if entry != ["/jarvice-rdma-plugin"]:
                fail(f"{oci_arch}: entrypoint {entry}")
            labels = config["config"].get("Labels", {})
            for key in ("org.opencontainers.image.version", "org.opencontainers.image.source",
                        "org.opencontainers.image.description"):
                if not labels.get(key):
                    fail(f"{oci_arch}: label {key} missing")
            if len(manifest["layers"]) != 1:
                fail(f"{oci_arch}: {len(manifest['layers'])} layers, want 1")
            layer = blob(manifest["layers"][0]["digest"])
            with tarfile.open(fileobj=io.BytesIO(layer)) as lt:
                files = [e for e in lt.getmembers() if not e.isdir()]
                if [e.name.lstrip("./") for e in files] != ["jarvice-rdma-plugin"]:
                    fail(f"{oci_arch}: layer holds {[e.name for e in lt.getmembers()]}")
                if not files[0].isfile() or not files[0].mode & 0o111:
                    fail(f"{oci_arch}: /jarvice-rdma-plugin is not an executable file")
                data = lt.extractfile(files[0]).read()
            with open(f"out/jarvice-rdma-plugin-{WANT[oci_arch]}", "rb") as f:
                if f.read() != data:
                    fail(f"{oci_arch}: the image's binary differs from out/jarvice-rdma-plugin-{WANT[oci_arch]}")
            print(f"check-images: {oci_arch}: 1 layer ({manifest['layers'][0]['size']} bytes, "
                  f"{manifest['layers'][0]['mediaType'].rsplit('.', 1)[-1]}), 1 file ({len(data)} bytes), "
                  f"entrypoint {entry[0]}, version {labels['org.opencontainers.image.version']}")


main(sys.argv[1])
