#!/usr/bin/env python3
"""Side-by-side benchmark: apilb, HAProxy (mode tcp, with and without splice) and the nginx
stream module, on loopback, in one run, with ratios.

Layout on this 2-core machine: the proxy runs alone on CPU 0 with one worker thread; the load
generators (iperf3, wrk, the idle-connection client) and the backends (iperf3 server, an nginx
serving a 100-byte body) run on CPU 1. Every load is bounded in time; every process started
here is ended here, by PID.

    python3 benches/compare.py            # full run (a few minutes)
    python3 benches/compare.py --quick    # smoke run (under a minute; figures not meaningful)

Prints one markdown table: absolute figures, then each target's ratio to the no-proxy
baseline and to HAProxy (mode tcp).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_CPU = "0"
LOAD_CPU = "1"

PORTS = {
    "iperf_backend": 25201,
    "http_backend": 25202,
    "idle_backend": 25203,
}
# Each proxy listens on three ports: throughput (to iperf3), http (to nginx), idle.
PROXY_PORTS = {
    "apilb": (25211, 25212, 25213),
    "haproxy": (25221, 25222, 25223),
    "haproxy-splice": (25231, 25232, 25233),
    "nginx": (25241, 25242, 25243),
}

started = []  # processes this script started, ended by PID at exit


def start(cmd, cpu, **kw):
    p = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=kw.pop("stdout", subprocess.DEVNULL),
                         stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
    started.append(p)
    return p


def stop_all():
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for p in started:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# === Backends ===

def start_backends(tmp):
    start(["iperf3", "-s", "-p", str(PORTS["iperf_backend"])], LOAD_CPU)
    body = "x" * 100
    conf = os.path.join(tmp, "backend-nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {tmp}/backend-nginx.pid;
error_log {tmp}/backend-nginx.err;
daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 16000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{PORTS['http_backend']} backlog=4096;
    location / {{ return 200 "{body}"; }}
  }}
  server {{
    listen 127.0.0.1:{PORTS['idle_backend']} backlog=4096;
    keepalive_timeout 3600s;
    client_header_timeout 3600s;
    location / {{ return 200 "{body}"; }}
  }}
}}
""")
    start(["nginx", "-c", conf, "-e", f"{tmp}/backend-nginx.err"], LOAD_CPU)
    for k in PORTS:
        wait_port(PORTS[k])


# === Proxies ===

def start_apilb(tmp, binary):
    t, h, i = PROXY_PORTS["apilb"]
    conf = os.path.join(tmp, "apilb.toml")
    with open(conf, "w") as f:
        for name, port in (("iperf", PORTS["iperf_backend"]), ("http", PORTS["http_backend"]), ("idle", PORTS["idle_backend"])):
            f.write(f'[[pool]]\nname = "{name}"\n[pool.health]\ninterval = "10s"\n[[pool.backend]]\naddress = "127.0.0.1:{port}"\n')
        for name, port in (("iperf", t), ("http", h), ("idle", i)):
            f.write(f'[[listener]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\npool = "{name}"\n')
    p = start([binary, "run", "--threads", "1", "--log-level", "warn", "--config", conf], PROXY_CPU)
    for port in (t, h, i):
        wait_port(port)
    return p


def start_haproxy(tmp, splice):
    name = "haproxy-splice" if splice else "haproxy"
    t, h, i = PROXY_PORTS[name]
    conf = os.path.join(tmp, f"{name}.cfg")
    with open(conf, "w") as f:
        f.write(f"""
global
  nbthread 1
  # Two descriptors per connection (and two per pipe with splice) within this machine's
  # open-file limit of 20,000.
  maxconn {9500 if splice else 9800}
  {"maxpipes 200" if splice else ""}
defaults
  mode tcp
  timeout connect 2s
  timeout client 1h
  timeout server 1h
  {"option splice-auto" if splice else ""}
listen iperf
  bind 127.0.0.1:{t}
  server b 127.0.0.1:{PORTS['iperf_backend']}
listen http
  bind 127.0.0.1:{h}
  server b 127.0.0.1:{PORTS['http_backend']}
listen idle
  bind 127.0.0.1:{i}
  server b 127.0.0.1:{PORTS['idle_backend']}
""")
    p = start(["haproxy", "-db", "-f", conf], PROXY_CPU)
    for port in (t, h, i):
        wait_port(port)
    return p


def start_nginx(tmp):
    t, h, i = PROXY_PORTS["nginx"]
    conf = os.path.join(tmp, "proxy-nginx.conf")
    mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
    load = f"load_module {mod};" if os.path.exists(mod) else ""
    with open(conf, "w") as f:
        f.write(f"""
{load}
worker_processes 1;
pid {tmp}/proxy-nginx.pid;
error_log {tmp}/proxy-nginx.err;
daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections 19500; }}
stream {{
  proxy_timeout 1h;
  server {{ listen 127.0.0.1:{t} backlog=4096; proxy_pass 127.0.0.1:{PORTS['iperf_backend']}; }}
  server {{ listen 127.0.0.1:{h} backlog=4096; proxy_pass 127.0.0.1:{PORTS['http_backend']}; }}
  server {{ listen 127.0.0.1:{i} backlog=4096; proxy_pass 127.0.0.1:{PORTS['idle_backend']}; }}
}}
""")
    p = start(["nginx", "-c", conf, "-e", f"{tmp}/proxy-nginx.err"], PROXY_CPU)
    for port in (t, h, i):
        wait_port(port)
    return p


# === Loads ===

def iperf(port, streams, secs):
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "iperf3", "-c", "127.0.0.1", "-p", str(port),
                          "-t", str(secs), "-P", str(streams), "-J"],
                         capture_output=True, text=True, timeout=secs + 30)
    data = json.loads(out.stdout)
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(port, secs, close):
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t2", "-c64", f"-d{secs}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")
    return rps, p99


def idle_memory(pid, port, count):
    """RSS growth of the proxy per idle proxied connection, in KiB."""
    time.sleep(0.5)
    before = rss_kib(pid)
    socks = []
    try:
        for n in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
            if n % 500 == 499:
                time.sleep(0.05)  # let the proxy accept and connect
        # One request on a sample so the connections are known to be proxied end to end.
        probe = socks[-1]
        probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        probe.settimeout(5)
        assert b"200" in probe.recv(4096)
        time.sleep(1.0)
        after = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return max(0, after - before) / count


def measure(name, ports, pid, args):
    t, h, i = ports
    r = {}
    # Idle memory first, on a proxy that has not yet grown its pools under load: RSS growth
    # is only meaningful from a cold start (later runs reuse memory the load left behind).
    r["idle"] = idle_memory(pid, i, args.idle) if pid else None
    r["tp1"] = iperf(t, 1, args.secs)
    r["tp8"] = iperf(t, 8, args.secs)
    r["rps"], r["p99"] = wrk(h, args.secs, close=False)
    r["cps"], _ = wrk(h, args.secs, close=True)
    print(f"  {name}: {r}", file=sys.stderr, flush=True)
    return r


def median_runs(fn, runs):
    results = [fn() for _ in range(runs)]
    out = {}
    for k in results[0]:
        vals = sorted(v[k] for v in results if v[k] is not None)
        out[k] = vals[len(vals) // 2] if vals else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: short loads, few idle connections")
    ap.add_argument("--runs", type=int, default=3, help="runs per target; the median is reported")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/apilb"))
    ap.add_argument("--only", help="measure only this proxy (apilb, haproxy, haproxy-splice, nginx) and the baseline")
    ap.add_argument("--idle", type=int, help="idle connections for the memory figure (default 9500; --quick: 500)")
    args = ap.parse_args()
    args.secs = 1 if args.quick else 5
    args.idle = args.idle or (500 if args.quick else 9500)
    if args.quick:
        args.runs = 1
    for tool in ("haproxy", "nginx", "iperf3", "wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run benches/compare.sh, which installs it")

    tmp = tempfile.mkdtemp(prefix="apilb-compare-")
    results = {}
    try:
        start_backends(tmp)
        print("measuring (proxy on CPU 0, load and backends on CPU 1)...", file=sys.stderr, flush=True)
        base_ports = (PORTS["iperf_backend"], PORTS["http_backend"], PORTS["idle_backend"])
        results["no proxy (the limit)"] = median_runs(lambda: measure("no proxy", base_ports, None, args), args.runs)
        for name, starter in (("apilb", lambda: start_apilb(tmp, args.binary)),
                              ("HAProxy mode tcp", lambda: start_haproxy(tmp, False)),
                              ("HAProxy + splice", lambda: start_haproxy(tmp, True)),
                              ("nginx stream", lambda: start_nginx(tmp))):
            key = {"apilb": "apilb", "HAProxy mode tcp": "haproxy", "HAProxy + splice": "haproxy-splice",
                   "nginx stream": "nginx"}[name]
            if args.only and args.only != key:
                continue

            def one_run():
                p = starter()
                try:
                    return measure(name, PROXY_PORTS[key], p.pid, args)
                finally:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        p.kill()
            results[name] = median_runs(one_run, args.runs)
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    def fmt(v, d=1):
        return "-" if v is None else f"{v:,.{d}f}"

    print(f"\n{'Quick smoke run: figures are not meaningful.' if args.quick else ''}")
    print(f"Loopback, proxy alone on CPU {PROXY_CPU} with one worker, load and backends on CPU {LOAD_CPU}; "
          f"median of {args.runs} run(s) of {args.secs}s; idle memory over {args.idle} connections.\n")
    print("| target | 1-stream Gbit/s | 8-stream Gbit/s | keep-alive req/s | p99 ms | new conn/s | KiB per idle conn |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {fmt(r['tp1'])} | {fmt(r['tp8'])} | {fmt(r['rps'], 0)} | {fmt(r['p99'], 2)} | "
              f"{fmt(r['cps'], 0)} | {fmt(r['idle'])} |")
    if args.only:
        return
    a, h, n, s = results["apilb"], results["HAProxy mode tcp"], results["nginx stream"], results["HAProxy + splice"]
    print("\n| apilb vs | 1-stream | 8-stream | keep-alive req/s | p99 (lower is better) | new conn/s | idle KiB (lower is better) |")
    print("|---|---|---|---|---|---|---|")
    for label, o in (("no proxy", results["no proxy (the limit)"]), ("HAProxy mode tcp", h), ("HAProxy + splice", s), ("nginx stream", n)):
        def ratio(k):
            return "-" if not a.get(k) or not o.get(k) else f"{a[k] / o[k]:.2f}x"
        print(f"| {label} | {ratio('tp1')} | {ratio('tp8')} | {ratio('rps')} | {ratio('p99')} | {ratio('cps')} | {ratio('idle')} |")


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
