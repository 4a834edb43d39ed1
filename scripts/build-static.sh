#!/usr/bin/env bash
# Builds the static release binary for one architecture and, with --test, runs the whole test
# suite against it (ppc64le and aarch64 under qemu-user). Output: out/jarvice-rdma-plugin-<arch>.
#
#   scripts/build-static.sh x86_64 [--test]    musl, through zig (cargo-zigbuild)
#   scripts/build-static.sh aarch64 [--test]   musl, through zig (`arm64` is an alias)
#   scripts/build-static.sh ppc64le [--test]   musl too, through zig, with a standard library
#                                              built from source (-Zbuild-std)
#   scripts/build-static.sh ARCH --test ARGS   the same, ARGS to cargo test (`--test metrics`)
#   scripts/build-static.sh x86_64 --bench     build, then run bench/ against that binary
#   scripts/build-static.sh ARCH --no-dra      the binary without the `dra` feature (the design
#                                              card's crates only), as out/...-<arch>-no-dra
#
# Installs what it needs (apt packages, rustup targets, zig from PyPI, cargo-zigbuild) and fails
# loudly when something cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-}"
mode="${2:-build}"
# With --test: the rest goes to cargo test (one suite, a filter).
extra=("${@:3}")
case "$mode" in build | --test | --bench | --no-dra) ;; *) echo "usage: $0 x86_64|aarch64|ppc64le [--test|--bench|--no-dra]" >&2; exit 2 ;; esac
# Docker/OCI call it arm64, rustup and the kernel aarch64: accept both, name the output aarch64.
[ "$arch" != arm64 ] || arch=aarch64
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

# zig (from PyPI) as C/C++ compiler and linker, through cargo-zigbuild.
zig_version=0.17.1
zigbuild_version=0.24.1
zig_setup() {
  # cargo-zigbuild runs `python3 -m ziglang` when no `zig` is on PATH.
  py_tools "ziglang==$zig_version"
  command -v cargo-zigbuild >/dev/null || cargo install -q cargo-zigbuild --version "$zigbuild_version" --locked
  # cargo-zigbuild writes its compiler wrappers (which name this clone's zig) to one directory
  # per user by default: another clone building at the same time rewrites them under our
  # running compiles and points them at its own venv. Keep them in this clone.
  export CARGO_ZIGBUILD_CACHE_DIR="$PWD/target/zigbuild"
  # cmake runs gRPC's C++ core through ccache with cargo-zigbuild's wrapper script as the
  # compiler. ccache's default check is the wrapper's mtime, which differs in every clone (and
  # the wrapper embeds the clone's venv path), so a fresh clone missed every compile. The
  # wrapper's name already carries the target and its flags; the pinned versions name the
  # compiler. (Only zig compiles go through ccache here.)
  export CCACHE_COMPILERCHECK="string:ziglang-$zig_version,cargo-zigbuild-$zigbuild_version"
}

# zig's musl (>= 1.2.4) hides off64_t unless asked; clang >= 19 rejects an old idiom in abseil.
# cargo-zigbuild's wrapper passes -g, but the release binary is stripped: -g0 (later on the
# command line, so it wins) saves about a fifth of the C++ compile time and the cache's space.
# All three only affect gRPC's C++ core.
musl_cflags="-D_LARGEFILE64_SOURCE -g0"
musl_cxxflags="-D_LARGEFILE64_SOURCE -Wno-missing-template-arg-list-after-template-kw -g0"

case "$arch" in
  x86_64)
    target=x86_64-unknown-linux-musl
    rustup target add "$target" >/dev/null
    zig_setup
    export CFLAGS_x86_64_unknown_linux_musl="$musl_cflags"
    export CXXFLAGS_x86_64_unknown_linux_musl="$musl_cxxflags"
    build=(cargo zigbuild --release --target "$target")
    test=(cargo-zigbuild test --release --target "$target")
    ;;
  aarch64)
    # rustup ships a musl standard library for aarch64, and grpcio-sys's pre-generated bindings
    # cover aarch64-unknown-linux-musl (LP64 like x86_64, no libc types in them): no bindgen.
    target=aarch64-unknown-linux-musl
    apt_need qemu-user
    command -v qemu-aarch64 >/dev/null || { echo "build-static: qemu-aarch64 missing after install" >&2; exit 1; }
    rustup target add "$target" >/dev/null || { echo "build-static: cannot install the $target standard library" >&2; exit 1; }
    zig_setup
    export CFLAGS_aarch64_unknown_linux_musl="$musl_cflags"
    export CXXFLAGS_aarch64_unknown_linux_musl="$musl_cxxflags"
    # panic = "abort" stays, as for x86_64: rustup's std carries both panic runtimes, so cargo
    # builds the test harnesses with unwind and the binary they spawn with the release profile,
    # i.e. the binary shipped. (ppc64le needs unwind because its one std is built from source.)
    # The binary is static: qemu needs no sysroot (-L).
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64
    # The tests spawn the plugin binary themselves: through qemu too (tests/common).
    export JARVICE_TEST_RUNNER=qemu-aarch64
    build=(cargo zigbuild --release --target "$target")
    test=(cargo-zigbuild test --release --target "$target")
    ;;
  ppc64le)
    # rustup ships no standard library for powerpc64le-unknown-linux-musl: build it from
    # rust-src (-Zbuild-std, which stable cargo allows with RUSTC_BOOTSTRAP=1).
    target=powerpc64le-unknown-linux-musl
    apt_need qemu-user libclang-dev
    command -v qemu-ppc64le >/dev/null || { echo "build-static: qemu-ppc64le missing after install" >&2; exit 1; }
    rustup component add rust-src >/dev/null
    zig_setup
    export RUSTC_BOOTSTRAP=1
    # abseil's PowerPC cycle clock needs glibc's __ppc_get_timebase_freq: use the portable clock.
    export CFLAGS_powerpc64le_unknown_linux_musl="$musl_cflags -DABSL_USE_UNSCALED_CYCLECLOCK=0"
    export CXXFLAGS_powerpc64le_unknown_linux_musl="$musl_cxxflags -DABSL_USE_UNSCALED_CYCLECLOCK=0"
    # grpcio-sys generates its bindings for ppc64le with bindgen, which needs musl's headers.
    zig_inc="$(python3 -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')/lib/libc/include"
    export BINDGEN_EXTRA_CLANG_ARGS="-I$zig_inc/powerpc64-linux-musl -I$zig_inc/powerpc-linux-any -I$zig_inc/generic-musl -I$zig_inc/any-linux-any"
    # A std built from source has no self-contained crt objects: zig's musl provides them.
    export CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C link-self-contained=no"
    # The test harness needs unwinding; build and test with one panic strategy, so the binary
    # the tests ran is the one shipped.
    export CARGO_PROFILE_RELEASE_PANIC=unwind
    export CARGO_TARGET_POWERPC64LE_UNKNOWN_LINUX_MUSL_RUNNER=qemu-ppc64le
    # The tests spawn the plugin binary themselves: through qemu too (tests/common).
    export JARVICE_TEST_RUNNER=qemu-ppc64le
    build=(cargo zigbuild --release --target "$target" "-Zbuild-std=std,panic_unwind")
    test=(cargo-zigbuild test --release --target "$target" "-Zbuild-std=std,panic_unwind,test")
    ;;
  *)
    echo "usage: $0 x86_64|aarch64|ppc64le [--test|--bench]" >&2
    exit 2
    ;;
esac

case "$mode" in
  # Builds the release binary too (integration tests run it), so no separate build is needed.
  --test) "${test[@]}" "${extra[@]}" ;;
  --bench) "${build[@]}" --bins --example bench ;;
  --no-dra) "${build[@]}" --no-default-features ;;
  *) "${build[@]}" ;;
esac
mkdir -p out
output="out/jarvice-rdma-plugin-$arch"
[ "$mode" != --no-dra ] || output="$output-no-dra"
cp "target/$target/release/jarvice-rdma-plugin" "$output"
info=$(file -b "$output")
echo "$output: $(stat -c %s "$output") bytes, $info"
case "$info" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) echo "build-static: $output is NOT statically linked" >&2; exit 1 ;;
esac

if [ "$mode" = --bench ]; then
  exec "target/$target/release/examples/bench"
fi
