#!/usr/bin/env bash
# Installs the comparison's tools from Debian's packages when missing, builds apilb in release
# mode, and runs benches/compare.py (pass --quick for the smoke run CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
need=()
for tool in haproxy nginx iperf3 wrk taskset python3 openssl curl strace; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(stream-module)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends haproxy nginx-light libnginx-mod-stream iperf3 wrk util-linux python3 openssl curl strace
fi
# Debian starts the packaged services on install where it can; they are not ours to stop,
# and the comparison listens on free ports the kernel hands out at start (benches/compare.py).
cargo build --release --quiet
exec python3 benches/compare.py "$@"
