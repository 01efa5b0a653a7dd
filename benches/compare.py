#!/usr/bin/env python3
"""Side-by-side benchmark: apilb, HAProxy (mode tcp, with and without splice) and the nginx
stream module, on loopback, in one run, with ratios: passthrough (throughput, request rates,
idle memory), a terminating TLS listener (full handshakes per second, bulk throughput), and
apilb's scaling from one worker thread to two.

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
    "tls_backend": 25204,
}
# Each proxy listens on four ports: throughput (to iperf3), http (to nginx), idle, and TLS
# terminated at the proxy (to nginx over TLS).
PROXY_PORTS = {
    "apilb": (25211, 25212, 25213, 25214),
    "haproxy": (25221, 25222, 25223, 25224),
    "haproxy-splice": (25231, 25232, 25233, 25234),
    "nginx": (25241, 25242, 25243, 25244),
}

started = []  # processes this script started, ended by PID at exit


def start(cmd, cpu, **kw):
    p = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=kw.pop("stdout", subprocess.DEVNULL),
                         stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
    started.append(p)
    return p


def stop(p):
    """Ends one proxy this script started, by PID: SIGTERM, then SIGKILL after 15 s."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()


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


# === Certificates ===

def make_pki(tmp):
    """A CA and an ECDSA P-256 server certificate for localhost/127.0.0.1, made with openssl:
    every TLS side (nginx backend, and each proxy's terminating listener) uses the same pair."""
    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True)
    k = {n: os.path.join(tmp, n) for n in ("ca.pem", "ca.key", "server.pem", "server.key", "server.csr", "ext.cnf", "combined.pem")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", k["ca.key"], "-out", k["ca.pem"], "-days", "2", "-subj", "/CN=apilb bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ossl("req", *ec, "-keyout", k["server.key"], "-out", k["server.csr"], "-subj", "/CN=localhost")
    with open(k["ext.cnf"], "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    ossl("x509", "-req", "-in", k["server.csr"], "-CA", k["ca.pem"], "-CAkey", k["ca.key"], "-CAcreateserial",
         "-out", k["server.pem"], "-days", "2", "-extfile", k["ext.cnf"])
    with open(k["combined.pem"], "w") as f:
        f.write(open(k["server.pem"]).read() + open(k["server.key"]).read())
    return k


# === Backends ===

def start_nginx_with(tmp, name, cpu, connections, body, preamble=""):
    """One nginx with one worker, in the foreground, its files in `tmp` under `name`."""
    conf = os.path.join(tmp, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""{preamble}
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err;
daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections {connections}; }}
{body}""")
    return start(["nginx", "-c", conf, "-e", f"{tmp}/{name}.err"], cpu)


def start_backends(tmp, pki, big_mib):
    start(["iperf3", "-s", "-p", str(PORTS["iperf_backend"])], LOAD_CPU)
    body = "x" * 100
    # The bulk TLS download: a sparse file, so the backend's disk is not what is measured.
    with open(os.path.join(tmp, "big"), "wb") as f:
        f.truncate(big_mib << 20)
    # nginx's workers drop root: they must be able to reach the file.
    os.chmod(tmp, 0o755)
    os.chmod(os.path.join(tmp, "big"), 0o644)
    start_nginx_with(tmp, "backend-nginx", LOAD_CPU, 16000, f"""
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
  server {{
    listen 127.0.0.1:{PORTS['tls_backend']} ssl backlog=4096;
    ssl_certificate {pki['server.pem']};
    ssl_certificate_key {pki['server.key']};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ return 200 "{body}"; }}
    location = /big {{ root {tmp}; }}
  }}
}}
""")
    for k in PORTS:
        wait_port(PORTS[k])


# === Proxies ===

def start_apilb(tmp, binary, pki, threads=1, cpu=None):
    t, h, i, x = PROXY_PORTS["apilb"]
    conf = os.path.join(tmp, "apilb.toml")
    with open(conf, "w") as f:
        for name, port in (("iperf", PORTS["iperf_backend"]), ("http", PORTS["http_backend"]),
                           ("idle", PORTS["idle_backend"]), ("tls", PORTS["tls_backend"])):
            f.write(f'[[pool]]\nname = "{name}"\n[pool.health]\ninterval = "10s"\n')
            if name == "tls":
                f.write(f'[pool.tls]\nca = "{pki["ca.pem"]}"\nserver_name = "localhost"\n')
            f.write(f'[[pool.backend]]\naddress = "127.0.0.1:{port}"\n')
        for name, port in (("iperf", t), ("http", h), ("idle", i), ("tls", x)):
            f.write(f'[[listener]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\npool = "{name}"\n')
            if name == "tls":
                f.write(f'mode = "terminate"\n[listener.tls]\ncert = "{pki["server.pem"]}"\nkey = "{pki["server.key"]}"\n')
    p = start([binary, "run", "--threads", str(threads), "--log-level", "warn", "--config", conf],
              PROXY_CPU if cpu is None else cpu)
    for port in (t, h, i, x):
        wait_port(port)
    return p


def start_haproxy(tmp, pki, splice):
    name = "haproxy-splice" if splice else "haproxy"
    t, h, i, x = PROXY_PORTS[name]
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
listen tls
  bind 127.0.0.1:{x} ssl crt {pki['combined.pem']}
  server b 127.0.0.1:{PORTS['tls_backend']} ssl verify required ca-file {pki['ca.pem']} sni str(localhost)
""")
    p = start(["haproxy", "-db", "-f", conf], PROXY_CPU)
    for port in (t, h, i, x):
        wait_port(port)
    return p


def start_nginx(tmp, pki):
    t, h, i, x = PROXY_PORTS["nginx"]
    mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
    load = f"load_module {mod};" if os.path.exists(mod) else ""
    p = start_nginx_with(tmp, "proxy-nginx", PROXY_CPU, 19500, f"""
stream {{
  proxy_timeout 1h;
  server {{ listen 127.0.0.1:{t} backlog=4096; proxy_pass 127.0.0.1:{PORTS['iperf_backend']}; }}
  server {{ listen 127.0.0.1:{h} backlog=4096; proxy_pass 127.0.0.1:{PORTS['http_backend']}; }}
  server {{ listen 127.0.0.1:{i} backlog=4096; proxy_pass 127.0.0.1:{PORTS['idle_backend']}; }}
  server {{
    listen 127.0.0.1:{x} ssl backlog=4096;
    ssl_certificate {pki['server.pem']};
    ssl_certificate_key {pki['server.key']};
    ssl_protocols TLSv1.2 TLSv1.3;
    proxy_pass 127.0.0.1:{PORTS['tls_backend']};
    proxy_ssl on;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {pki['ca.pem']};
    proxy_ssl_name localhost;
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
  }}
}}
""", preamble=load)
    for port in (t, h, i, x):
        wait_port(port)
    return p


# === Loads ===

def iperf(port, streams, secs, cpu=LOAD_CPU):
    out = subprocess.run(["taskset", "-c", cpu, "iperf3", "-c", "127.0.0.1", "-p", str(port),
                          "-t", str(secs), "-P", str(streams), "-J"],
                         capture_output=True, text=True, timeout=secs + 30)
    data = json.loads(out.stdout)
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(port, secs, close, scheme="http", cpu=LOAD_CPU):
    cmd = ["taskset", "-c", cpu, "wrk", "-t2", "-c64", f"-d{secs}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"{scheme}://127.0.0.1:{port}/")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")
    return rps, p99


def tls_download(port):
    """One download of the bulk file over TLS, in Gbit/s (curl, HTTP/1.1, no verification:
    the client's cost is the same for every target)."""
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "curl", "-sk", "--http1.1", "-o", "/dev/null",
                          "-w", "%{speed_download} %{http_code}", f"https://127.0.0.1:{port}/big"],
                         capture_output=True, text=True, timeout=120).stdout.split()
    if len(out) != 2 or out[1] != "200":
        raise RuntimeError(f"TLS download through port {port} failed: {out}")
    return float(out[0]) * 8 / 1e9


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


def cpu_seconds(pid):
    """User and system CPU of a process and its descendants (nginx's workers), in seconds."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(name, ports, pid, args):
    t, h, i, x = ports
    r = dict.fromkeys(("idle", "tp1", "tp8", "rps", "p99", "cps", "hs", "tlsbulk",
                       "cpu_tp1", "cpu_rps", "cpu_cps", "cpu_hs", "cpu_tlsbulk"))
    want = set(args.measure.split(","))

    def timed(key, fn, per_unit):
        """Runs one load; with a proxy, also records its CPU time per unit of work."""
        c0, t0 = (cpu_seconds(pid), time.time()) if pid else (0, 0)
        out = fn()
        if pid:
            value = out[0] if isinstance(out, tuple) else out
            if value:
                r["cpu_" + key] = (cpu_seconds(pid) - c0) / (per_unit(value) * (time.time() - t0))
        return out

    gb = lambda gbps: gbps / 8  # noqa: E731 (GB per second from Gbit/s)
    # Idle memory first, on a proxy that has not yet grown its pools under load: RSS growth
    # is only meaningful from a cold start (later runs reuse memory the load left behind).
    if pid and "idle" in want:
        r["idle"] = idle_memory(pid, i, args.idle)
    if "tp" in want:
        r["tp1"] = timed("tp1", lambda: iperf(t, 1, args.secs), gb)
        r["tp8"] = iperf(t, 8, args.secs)
    if "rps" in want:
        r["rps"], r["p99"] = timed("rps", lambda: wrk(h, args.secs, close=False), lambda v: v)
    if "cps" in want:
        r["cps"], _ = timed("cps", lambda: wrk(h, args.secs, close=True), lambda v: v)
    if "tls" in want:
        # A full handshake per connection: wrk does not resume TLS sessions.
        r["hs"], _ = timed("hs", lambda: wrk(x, args.secs, close=True, scheme="https"), lambda v: v)
        r["tlsbulk"] = timed("tlsbulk", lambda: tls_download(x), gb)
    print(f"  {name}: {r}", file=sys.stderr, flush=True)
    return r


def median_runs(fn, runs):
    results = [fn() for _ in range(runs)]
    out = {}
    for k in results[0]:
        vals = sorted(v[k] for v in results if v[k] is not None)
        out[k] = vals[len(vals) // 2] if vals else None
    return out


def measure_scaling(args):
    """apilb with 1 and then 2 worker threads, nothing pinned (the proxy, the loads and the
    backends share both cores): does the work spread over threads?"""
    out = {}
    for threads in (1, 2):
        p = start_apilb(args.tmp, args.binary, args.pki, threads=threads, cpu="0,1")
        t, h, _, x = PROXY_PORTS["apilb"]
        try:
            out[threads] = {
                "tp8": iperf(t, 8, args.secs, cpu="0,1"),
                "rps": wrk(h, args.secs, close=False, cpu="0,1")[0],
                "cps": wrk(h, args.secs, close=True, cpu="0,1")[0],
                "hs": wrk(x, args.secs, close=True, scheme="https", cpu="0,1")[0],
            }
            print(f"  apilb --threads {threads}, unpinned: {out[threads]}", file=sys.stderr, flush=True)
        finally:
            stop(p)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: short loads, few idle connections")
    ap.add_argument("--runs", type=int, default=3, help="runs per target; the median is reported")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/apilb"))
    ap.add_argument("--only", help="measure only this proxy (apilb, haproxy, haproxy-splice, nginx) and the baseline")
    ap.add_argument("--idle", type=int, help="idle connections for the memory figure (default 9500; --quick: 500)")
    ap.add_argument("--measure", default="idle,tp,rps,cps,tls,scaling",
                    help="comma-separated subset of: idle, tp (iperf3), rps (keep-alive), cps (new connections), "
                         "tls (terminating listener: handshakes and bulk), scaling (apilb, 1 vs 2 threads)")
    args = ap.parse_args()
    args.secs = 1 if args.quick else 5
    args.idle = args.idle or (500 if args.quick else 9500)
    if args.quick:
        args.runs = 1
    for tool in ("haproxy", "nginx", "iperf3", "wrk", "taskset", "openssl", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run benches/compare.sh, which installs it")

    args.tmp = tmp = tempfile.mkdtemp(prefix="apilb-compare-")
    results = {}
    scaling = None
    try:
        args.pki = pki = make_pki(tmp)
        start_backends(tmp, pki, 32 if args.quick else 1024)
        print("measuring (proxy on CPU 0, load and backends on CPU 1)...", file=sys.stderr, flush=True)
        base_ports = (PORTS["iperf_backend"], PORTS["http_backend"], PORTS["idle_backend"], PORTS["tls_backend"])
        results["no proxy (the limit)"] = median_runs(lambda: measure("no proxy", base_ports, None, args), args.runs)
        for name, key, starter in (("apilb", "apilb", lambda: start_apilb(tmp, args.binary, pki)),
                                   ("HAProxy mode tcp", "haproxy", lambda: start_haproxy(tmp, pki, False)),
                                   ("HAProxy + splice", "haproxy-splice", lambda: start_haproxy(tmp, pki, True)),
                                   ("nginx stream", "nginx", lambda: start_nginx(tmp, pki))):
            if args.only and args.only != key:
                continue

            def one_run():
                p = starter()
                try:
                    return measure(name, PROXY_PORTS[key], p.pid, args)
                finally:
                    stop(p)
            results[name] = median_runs(one_run, args.runs)
        if "scaling" in args.measure.split(","):
            scaling = measure_scaling(args)
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, scaling, args)


def report(results, scaling, args):
    def fmt(v, d=1):
        return "-" if v is None else f"{v:,.{d}f}"

    def ratios(a, o, keys):
        return " | ".join("-" if not a.get(k) or not o.get(k) else f"{a[k] / o[k]:.2f}x" for k in keys)

    print(f"\n{'Quick smoke run: figures are not meaningful.' if args.quick else ''}")
    print(f"Loopback, proxy alone on CPU {PROXY_CPU} with one worker, load and backends on CPU {LOAD_CPU}; "
          f"median of {args.runs} run(s) of {args.secs}s; idle memory over {args.idle} connections.\n")
    print("Passthrough (HAProxy and nginx in plain TCP mode):\n")
    print("| target | 1-stream Gbit/s | 8-stream Gbit/s | keep-alive req/s | p99 ms | new conn/s | KiB per idle conn |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {fmt(r['tp1'])} | {fmt(r['tp8'])} | {fmt(r['rps'], 0)} | {fmt(r['p99'], 2)} | "
              f"{fmt(r['cps'], 0)} | {fmt(r['idle'])} |")
    others = [(label, results.get(name)) for label, name in (
        ("no proxy", "no proxy (the limit)"), ("HAProxy mode tcp", "HAProxy mode tcp"),
        ("HAProxy + splice", "HAProxy + splice"), ("nginx stream", "nginx stream"))]
    others = [(label, o) for label, o in others if o]
    a = results.get("apilb")
    if a and len(others) > 1:
        print("\n| apilb vs | 1-stream | 8-stream | keep-alive req/s | p99 (lower is better) | new conn/s | idle KiB (lower is better) |")
        print("|---|---|---|---|---|---|---|")
        for label, o in others:
            print(f"| {label} | {ratios(a, o, ('tp1', 'tp8', 'rps', 'p99', 'cps', 'idle'))} |")

    if any(r.get("hs") for r in results.values()):
        print("\nTerminating TLS (ECDSA P-256 certificate; the proxy re-encrypts to an nginx TLS backend, "
              "verifying it): full handshakes/s is wrk with `Connection: close` (no session resumption), "
              "bulk is one curl download of the backend's large file.\n")
        print("| target | full TLS handshakes/s | TLS bulk Gbit/s |")
        print("|---|---|---|")
        for name, r in results.items():
            if name == "HAProxy + splice":
                continue  # the same TLS listener as HAProxy mode tcp
            label = {"HAProxy mode tcp": "HAProxy `bind ssl`", "nginx stream": "nginx stream `ssl`",
                     "no proxy (the limit)": "no proxy (nginx TLS direct)"}.get(name, name)
            print(f"| {label} | {fmt(r['hs'], 0)} | {fmt(r['tlsbulk'])} |")
        if a and len(others) > 1:
            print("\n| apilb vs | handshakes/s | TLS bulk |")
            print("|---|---|---|")
            for label, o in others:
                if label != "HAProxy + splice":
                    label = {"HAProxy mode tcp": "HAProxy `bind ssl`", "nginx stream": "nginx stream `ssl`"}.get(label, label)
                    print(f"| {label} | {ratios(a, o, ('hs', 'tlsbulk'))} |")

    if any(r.get("cpu_cps") or r.get("cpu_hs") for r in results.values()):
        print("\nProxy CPU per unit of work (user + system, including the kernel's loopback TCP work done "
              "in the proxy's system calls; lower is better). On this machine the load generators and "
              "backends often saturate their core first, so these show the proxies' headroom where the "
              "rates above cannot.\n")
        print("| target | ms per GB (1 stream) | us per keep-alive request | us per new connection | "
              "us per TLS handshake | ms per GB TLS bulk |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            if name.startswith("no proxy"):
                continue
            ms = lambda v: None if v is None else v * 1e3  # noqa: E731
            us = lambda v: None if v is None else v * 1e6  # noqa: E731
            print(f"| {name} | {fmt(ms(r['cpu_tp1']), 0)} | {fmt(us(r['cpu_rps']))} | {fmt(us(r['cpu_cps']))} | "
                  f"{fmt(us(r['cpu_hs']), 0)} | {fmt(ms(r['cpu_tlsbulk']), 0)} |")
        if a and len(others) > 1:
            print("\n| apilb's CPU vs | per GB | per request | per new connection | per TLS handshake | per GB TLS |")
            print("|---|---|---|---|---|---|")
            for label, o in others:
                if label != "no proxy":
                    print(f"| {label} | {ratios(a, o, ('cpu_tp1', 'cpu_rps', 'cpu_cps', 'cpu_hs', 'cpu_tlsbulk'))} |")

    if scaling:
        print(f"\nScaling: apilb `--threads 1` and `--threads 2`, nothing pinned (proxy, loads and backends "
              f"share the 2 cores); one run of {args.secs}s each.\n")
        print("| apilb worker threads | 8-stream Gbit/s | keep-alive req/s | new conn/s | full TLS handshakes/s |")
        print("|---|---|---|---|---|")
        for n in (1, 2):
            r = scaling[n]
            print(f"| {n} | {fmt(r['tp8'])} | {fmt(r['rps'], 0)} | {fmt(r['cps'], 0)} | {fmt(r['hs'], 0)} |")
        print(f"| 2 vs 1 | {ratios(scaling[2], scaling[1], ('tp8', 'rps', 'cps', 'hs'))} |")


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
