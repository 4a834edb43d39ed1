#!/usr/bin/env bash
# Builds the static release binary for one architecture and, with --test, runs the whole test
# suite against it (ppc64le under qemu-user). Output: out/jarvice-rdma-plugin-<arch>.
#
#   scripts/build-static.sh x86_64 [--test]    musl, through zig (cargo-zigbuild)
#   scripts/build-static.sh ppc64le [--test]   glibc static, Debian's cross gcc (no musl route
#                                              here yet: see the README's design notes)
#   scripts/build-static.sh x86_64 --bench     build, then run bench/ against that binary
#
# Installs what it needs (apt packages, rustup targets, zig from PyPI, cargo-zigbuild) and fails
# loudly when something cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-}"
mode="${2:-build}"
case "$mode" in build | --test | --bench) ;; *) echo "usage: $0 x86_64|ppc64le [--test|--bench]" >&2; exit 2 ;; esac
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

case "$arch" in
  x86_64)
    target=x86_64-unknown-linux-musl
    rustup target add "$target" >/dev/null
    # cargo-zigbuild runs `python3 -m ziglang` when no `zig` is on PATH.
    py_tools ziglang==0.17.1
    command -v cargo-zigbuild >/dev/null || cargo install -q cargo-zigbuild --version 0.24.1 --locked
    # zig's musl (>= 1.2.4) hides off64_t unless asked; clang >= 19 rejects an old idiom in
    # abseil. Both only affect gRPC's C++ core.
    export CFLAGS_x86_64_unknown_linux_musl=-D_LARGEFILE64_SOURCE
    export CXXFLAGS_x86_64_unknown_linux_musl="-D_LARGEFILE64_SOURCE -Wno-missing-template-arg-list-after-template-kw"
    build=(cargo zigbuild --release --target "$target")
    test=(cargo-zigbuild test --release --target "$target")
    ;;
  ppc64le)
    target=powerpc64le-unknown-linux-gnu
    apt_need gcc-powerpc64le-linux-gnu g++-powerpc64le-linux-gnu libc6-dev-ppc64el-cross qemu-user libclang-dev
    rustup target add "$target" >/dev/null
    export CC_powerpc64le_unknown_linux_gnu=powerpc64le-linux-gnu-gcc
    export CXX_powerpc64le_unknown_linux_gnu=powerpc64le-linux-gnu-g++
    export AR_powerpc64le_unknown_linux_gnu=powerpc64le-linux-gnu-ar
    export CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_LINKER=powerpc64le-linux-gnu-gcc
    export CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static'
    export CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_RUNNER='qemu-ppc64le -L /usr/powerpc64le-linux-gnu'
    # The tests spawn the plugin binary themselves: through qemu too (tests/common).
    export JARVICE_TEST_RUNNER="$CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_GNU_RUNNER"
    command -v qemu-ppc64le >/dev/null || { echo "build-static: qemu-ppc64le missing after install" >&2; exit 1; }
    build=(cargo build --release --target "$target")
    test=(cargo test --release --target "$target")
    ;;
  *)
    echo "usage: $0 x86_64|ppc64le [--test]" >&2
    exit 2
    ;;
esac

case "$mode" in
  # Builds the release binary too (integration tests run it), so no separate build is needed.
  --test) "${test[@]}" ;;
  --bench) "${build[@]}" --bins --example bench ;;
  *) "${build[@]}" ;;
esac
mkdir -p out
cp "target/$target/release/jarvice-rdma-plugin" "out/jarvice-rdma-plugin-$arch"
info=$(file -b "out/jarvice-rdma-plugin-$arch")
echo "out/jarvice-rdma-plugin-$arch: $(stat -c %s "out/jarvice-rdma-plugin-$arch") bytes, $info"
case "$info" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) echo "build-static: out/jarvice-rdma-plugin-$arch is NOT statically linked" >&2; exit 1 ;;
esac

if [ "$mode" = --bench ]; then
  exec "target/$target/release/examples/bench"
fi
