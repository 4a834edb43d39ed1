#!/usr/bin/env bash
# Quick start, command 1: builds the plugin and runs the main job end to end with no cluster:
# mock device nodes in a temp tree, the real binary, and our fake kubelet over real unix
# sockets. Prints the registration, the device list and an Allocate answer, then cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
echo "building (the first build compiles gRPC's C++ core: 8-14 minutes on 2 cores)..." >&2
cargo build --quiet --bins --example demo
exec target/debug/examples/demo
