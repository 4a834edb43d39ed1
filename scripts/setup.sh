#!/usr/bin/env bash
# Sourced by the other scripts: installs what a fresh Debian 12 machine lacks for a native
# build (cmake for grpcio-sys's C++ core; ccache so profile changes rebuild it in minutes) and
# sets the build environment. Idempotent: installs nothing when everything is present.

# apt_need PKG...: installs the Debian packages that are missing.
apt_need() {
  local missing=() pkg sudo=""
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]} (apt)" >&2
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# py_tools PKG==VERSION...: installs Python tools into a venv under target/ (Debian's own
# python3 refuses pip installs into the system) and puts that venv first on PATH.
py_tools() {
  local venv="$PWD/target/py-tools"
  if [ ! -x "$venv/bin/python3" ]; then
    command -v python3 >/dev/null 2>&1 || apt_need python3
    python3 -m venv "$venv" 2>/dev/null || {
      apt_need python3-venv
      python3 -m venv "$venv"
    }
  fi
  "$venv/bin/python3" -m pip install -q --disable-pip-version-check "$@"
  export PATH="$venv/bin:$PATH"
}

# deb_tool PKG FILE...: the FILEs (paths inside the Debian package PKG, /usr/bin/promtool) taken
# out of the package into target/debs/PKG without installing it (no dependencies, no maintainer
# scripts: prometheus' would start a server), and their directories put first on PATH.
deb_tool() {
  local pkg=$1 dir="$PWD/target/debs/$1" f tmp missing=() sudo=""
  shift
  for f in "$@"; do
    [ -x "$dir$f" ] || missing+=(".$f")
  done
  if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || sudo=sudo
    tmp=$(mktemp -d)
    # As root, apt downloads as the user _apt: let it write here.
    if [ -z "$sudo" ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
    echo "setup: taking ${missing[*]#.} out of Debian's $pkg (apt-get download, not installed)" >&2
    if ! (cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null); then
      $sudo apt-get update -qq
      (cd "$tmp" && apt-get download -qq "$pkg")
    fi
    mkdir -p "$dir"
    dpkg-deb --fsys-tarfile "$tmp/$pkg"_*.deb | tar -x -C "$dir" "${missing[@]}"
    rm -rf "$tmp"
  fi
  for f in "$@"; do
    PATH="$dir$(dirname "$f"):$PATH"
  done
  export PATH
}

apt_need cmake ccache g++ make file
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache
# Paths under the checkout count as relative, so another clone (CI's) hits the same cache.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR=true
