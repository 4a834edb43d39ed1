#!/usr/bin/env bash
# Builds the three scratch images and the manifest list without a Docker engine (buildah, vfs
# storage, chroot isolation), writes them to out/images.oci.tar and checks them. Then runs the
# x86_64 image's binary inside the image (a scratch root: nothing but the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
apt_need buildah
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
rm -f out/images.oci.tar
./manifest.sh --builder buildah --version "$version" --oci-archive out/images.oci.tar
python3 scripts/check-images.py out/images.oci.tar
ls -l out/images.oci.tar
bah=(buildah --storage-driver vfs)
ctr=$("${bah[@]}" from "jarvice/k8s-rdma-device:$version-amd64")
trap '"${bah[@]}" rm "$ctr" >/dev/null' EXIT
"${bah[@]}" run --isolation chroot "$ctr" -- /jarvice-rdma-plugin --version
"${bah[@]}" run --isolation chroot "$ctr" -- /jarvice-rdma-plugin list --host-root=/ | head -n 5
echo "check-images: the x86_64 image runs its binary from scratch"
