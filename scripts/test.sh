#!/usr/bin/env bash
# Quick start, command 2: the whole test suite (unit tests, and the real binary against our
# fake kubelet). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
cargo test "$@"
