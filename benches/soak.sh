#!/usr/bin/env bash
# Runs the soak test, benches/soak.py (pass --smoke for the 60 s run CI does, --minutes N,
# --json FILE, --binary PATH). It needs python3, openssl and prlimit (util-linux): when one
# is missing it is installed from Debian's packages with apt-get; nothing else is installed,
# and apilb is not built here (default binary: target/release/apilb, from cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
exec python3 benches/soak.py "$@"
