#!/usr/bin/env bash
# Quick start, command 2: the whole test suite (unit tests, and the real binary against our
# fake kubelet and fake API server), then the build without the default features `dra` and
# `metrics` (the design card's binary: grpcio, protobuf, libc, log, env_logger, getopts) with
# its unit tests. Extra arguments go to the first `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
# promtool, out of Debian's prometheus package (not installed): tests/metrics.rs lints a scrape.
deb_tool prometheus /usr/bin/promtool
PROMTOOL=$(command -v promtool)
export PROMTOOL
# Formatting first: it takes a second and fails before any build (rustup's minimal profile
# has no rustfmt).
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo fmt --all --check
cargo test "$@"
if [ $# -eq 0 ]; then
  cargo test --no-default-features --lib --bins
  if cargo tree --no-default-features -e normal --prefix none | grep -E '^(ureq|rustls|serde_json|k8s-openapi|prometheus|httparse) '; then
    echo "test.sh: the build without the default features pulls in a DRA or metrics crate" >&2
    exit 1
  fi
  echo "test.sh: --no-default-features builds the card's binary and passes its unit tests"
fi
