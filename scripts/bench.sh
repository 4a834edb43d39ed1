#!/usr/bin/env bash
# The benchmark: builds the shipped static x86_64 binary and runs bench/ against it and our
# fake kubelet. Prints a Markdown table; about 40 s after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
case "$(uname -m)" in
  x86_64) exec scripts/build-static.sh x86_64 --bench ;;
  *) echo "bench.sh: the benchmark runs on x86_64 hosts (ppc64le figures under qemu would measure qemu)" >&2; exit 2 ;;
esac
