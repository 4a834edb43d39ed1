#!/usr/bin/env bash
# Builds and pushes the per-architecture images and joins them into one multi-arch manifest
# list, the way users of the original did it by hand:
#   <registry>/<image>:<version>-amd64, -ppc64le and -arm64  ->  <registry>/<image>:<version>
#
# Usage: ./manifest.sh [--registry HOST] [--image NAME] [--version V] [--builder docker|buildah]
#                      [--oci-archive FILE] [--no-build] [--dry-run]
#   --registry     registry host, e.g. docker.io or registry.example.com:5000 [default: none,
#                  i.e. Docker Hub through the client's defaults]
#   --image        repository [default: jarvice/k8s-rdma-device]
#   --version      tag [default: the version in Cargo.toml]
#   --builder      docker (docker build/push/manifest) or buildah (daemonless)
#                  [default: docker if a Docker engine answers, else buildah]
#   --oci-archive  buildah only: write the manifest list and the three images to this OCI archive
#                  instead of pushing (for checking images offline)
#   --no-build     skip building the images (they exist locally already)
#   --dry-run      print every command instead of running it
# The static binaries must exist first: scripts/build-static.sh x86_64, ... ppc64le and ... aarch64.
# Environment: REGISTRY, IMAGE, VERSION, BUILDER give the same defaults as the flags.
set -euo pipefail
cd "$(dirname "$0")"

registry="${REGISTRY:-}"
image="${IMAGE:-jarvice/k8s-rdma-device}"
version="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)}"
builder="${BUILDER:-}"
archive=""
build=1
dry=0

usage() {
  local text
  text=$(sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//')
  if [ "${1:-0}" = 0 ]; then echo "$text"; else echo "$text" >&2; fi
  exit "${1:-0}"
}

while (($#)); do
  case "$1" in
    --registry) registry="${2:?--registry needs a value}"; shift 2 ;;
    --image) image="${2:?--image needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --builder) builder="${2:?--builder needs a value}"; shift 2 ;;
    --oci-archive) archive="${2:?--oci-archive needs a value}"; shift 2 ;;
    --no-build) build=0; shift ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage 0 ;;
    *) echo "manifest.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

if [ -z "$builder" ]; then
  if docker info >/dev/null 2>&1; then builder=docker; else builder=buildah; fi
fi
case "$builder" in docker | buildah) ;; *) echo "manifest.sh: --builder must be docker or buildah" >&2; exit 2 ;; esac
if [ -n "$archive" ] && [ "$builder" != buildah ]; then
  echo "manifest.sh: --oci-archive needs --builder buildah" >&2
  exit 2
fi
if [[ ! "$version" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
  echo "manifest.sh: $version is not a valid image tag" >&2
  exit 2
fi

repo="${registry:+$registry/}$image"
list="$repo:$version"

run() {
  if ((dry)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# BuildKit (docker buildx, the default builder since Docker 23) attaches provenance and SBOM
# attestations, which turns each pushed per-arch tag into an index that `docker manifest create`
# refuses ("is a manifest list"). Plain images are what a manifest list joins.
docker_build=(docker build)
if [ "$builder" = docker ] && docker buildx version >/dev/null 2>&1; then
  docker_build+=(--provenance=false --sbom=false)
fi

# Debian's buildah as root in a container: vfs storage and chroot isolation need no daemon,
# no overlay mounts and no user namespaces.
bah=(buildah --storage-driver vfs)

for arch in x86_64 ppc64le aarch64; do
  if ((build)) && ((!dry)) && [ ! -x "out/jarvice-rdma-plugin-$arch" ]; then
    echo "manifest.sh: out/jarvice-rdma-plugin-$arch is missing: run scripts/build-static.sh $arch" >&2
    exit 1
  fi
done

# Docker/OCI architecture names; the per-arch tags keep the original's -amd64 / -ppc64le / -arm64.
for pair in x86_64:amd64 ppc64le:ppc64le aarch64:arm64; do
  arch="${pair%%:*}"
  oci="${pair##*:}"
  tag="$list-$oci"
  if ((build)); then
    if [ "$builder" = docker ]; then
      run "${docker_build[@]}" --platform "linux/$oci" --build-arg "VERSION=$version" -f "Dockerfile.$arch" -t "$tag" .
    else
      run "${bah[@]}" bud --isolation chroot --arch "$oci" --os linux --build-arg "VERSION=$version" \
        -f "Dockerfile.$arch" -t "$tag" .
    fi
  fi
  if [ -z "$archive" ]; then
    if [ "$builder" = docker ]; then
      run docker push "$tag"
    else
      run "${bah[@]}" push "$tag" "docker://$tag"
    fi
  fi
done

if [ "$builder" = docker ]; then
  run docker manifest rm "$list" 2>/dev/null || true
  run docker manifest create "$list" "$list-amd64" "$list-ppc64le" "$list-arm64"
  run docker manifest annotate --os linux --arch amd64 "$list" "$list-amd64"
  run docker manifest annotate --os linux --arch ppc64le "$list" "$list-ppc64le"
  run docker manifest annotate --os linux --arch arm64 "$list" "$list-arm64"
  run docker manifest push --purge "$list"
else
  if ((!dry)) && "${bah[@]}" manifest exists "$list" 2>/dev/null; then
    "${bah[@]}" manifest rm "$list" >/dev/null
  fi
  run "${bah[@]}" manifest create "$list"
  run "${bah[@]}" manifest add --os linux --arch amd64 "$list" "$list-amd64"
  run "${bah[@]}" manifest add --os linux --arch ppc64le "$list" "$list-ppc64le"
  run "${bah[@]}" manifest add --os linux --arch arm64 "$list" "$list-arm64"
  if [ -n "$archive" ]; then
    run "${bah[@]}" manifest push --all --format oci "$list" "oci-archive:$archive"
  else
    run "${bah[@]}" manifest push --all "$list" "docker://$list"
  fi
fi
((dry)) || echo "manifest.sh: $list -> $list-amd64, $list-ppc64le, $list-arm64"
