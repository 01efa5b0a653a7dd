#!/usr/bin/env python3
"""Side-by-side benchmark: apilb, HAProxy (mode tcp, with and without splice) and the nginx
stream module, on loopback, in one run, with ratios: passthrough (throughput, request rates,
idle memory), a terminating TLS listener (full handshakes per second, bulk throughput),
apilb's scaling from one worker thread to two, the keep-alive tail over ten runs per proxy,
and each proxy's system calls per new connection and per request (strace).

Layout on this 2-core machine: the proxy runs alone on CPU 0 with one worker thread; the load
generators (iperf3, wrk, the idle-connection client) and the backends (iperf3 server, an nginx
serving a 100-byte body) run on CPU 1. Every load is bounded in time; every process started
here is ended here, by PID, also on failure and on SIGINT, SIGTERM or SIGHUP.

Structure: LISTENERS is the one table of the listeners every proxy has and of the backend
behind each; the backends, each proxy's config and the port allocation are all derived from
it, so a new listener is one entry there (plus the load in `measure` that uses it). TARGETS
lists what is measured (the no-proxy baseline and the proxies). Ports are free loopback ports
the kernel hands out at start (see `Ports`). Measurements are numbers (METRICS names them and
their units); the tables are rendered from that data at the end, and `--json FILE` writes it.

    python3 benches/compare.py                    # full run (about 20 minutes)
    python3 benches/compare.py --quick            # smoke run (about a minute; figures not meaningful)
    python3 benches/compare.py --json out.json    # also write every run's figures and the ratios

Prints markdown tables: absolute figures, then apilb's ratio to the no-proxy baseline and to
each other proxy.
"""

import argparse
import atexit
import hashlib
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import end_all, log_tail, on_signal  # noqa: E402
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_CPU = "0"
LOAD_CPU = "1"
BODY = "x" * 100  # the nginx backends' response


# === Topology ===

@dataclass(frozen=True)
class Listener:
    """A listener every proxy has, the backend behind it, and what is measured through it."""
    name: str          # the listener's and its pool's name in every config; its key in the port maps
    role: str          # what is measured through it
    backend: str       # "iperf3": an iperf3 server of its own; "nginx": a server block in the backend nginx
    tls: bool = False  # terminated at the proxy, which re-encrypts to a TLS backend and verifies it
    nginx: str = ""    # more directives for its backend nginx server block; {tmp} is the run's directory


LISTENERS = (
    Listener("throughput", "iperf3 through the proxy, 1 and 8 streams (--measure tp)", "iperf3"),
    Listener("http", "wrk against the 100-byte response, keep-alive and Connection: close (rps, cps)",
             "nginx"),
    Listener("idle", "idle proxied connections: RSS growth per connection (idle)", "nginx",
             nginx="keepalive_timeout 3600s; client_header_timeout 3600s;"),
    Listener("tls", "terminated at the proxy: full handshakes with wrk, one bulk download with curl (tls)",
             "nginx", tls=True, nginx="location = /big { root {tmp}; }"),
)


@dataclass(frozen=True)
class Target:
    """The baseline (no proxy: the loads go to the backends) or one proxy with its options."""
    key: str                  # --only's name; the key in the port map and in the JSON
    label: str                # its row in the tables
    proxy: str = None         # "apilb", "haproxy" or "nginx"; None for the baseline
    options: dict = field(default_factory=dict)  # for the proxy's config writer
    vs_label: str = None      # its row in the "apilb vs" tables (default: label)
    tls_label: str = None     # its row in the TLS tables (default: label)
    tls_vs_label: str = None  # its row in the TLS "apilb vs" table (default: tls_label)
    tls_rows: bool = True     # False: the same TLS listener as another target (measured, not shown)

    def __post_init__(self):
        object.__setattr__(self, "vs_label", self.vs_label or self.label)
        object.__setattr__(self, "tls_label", self.tls_label or self.label)
        object.__setattr__(self, "tls_vs_label", self.tls_vs_label or self.tls_label)


TARGETS = (
    Target("baseline", "no proxy (the limit)", vs_label="no proxy",
           tls_label="no proxy (nginx TLS direct)", tls_vs_label="no proxy"),
    Target("apilb", "apilb", "apilb"),
    # The same apilb with an SNI route on every plain listener: each connection's first bytes
    # are read by the ClientHello reader (not TLS: the default pool) and written ahead of the
    # relay. What routes cost per connection (SPEC §9).
    Target("apilb-routes", "apilb + SNI routes", "apilb", {"routes": True}, tls_rows=False),
    Target("haproxy", "HAProxy mode tcp", "haproxy", tls_label="HAProxy `bind ssl`"),
    Target("haproxy-splice", "HAProxy + splice", "haproxy", {"splice": True}, tls_rows=False),
    Target("nginx", "nginx stream", "nginx", tls_label="nginx stream `ssl`"),
)
# apilb again for the scaling loads, on ports of its own: its first ports were left unbound
# while the other proxies ran (see Ports).
SCALING = Target("apilb-scaling", "apilb, unpinned", "apilb")

# Every figure, in the unit its key names: (unit, which way is better, what).
METRICS = {
    "idle_kib_per_conn": ("KiB", "lower", "RSS growth of a freshly started proxy per idle proxied connection "
                                           "(one request relayed, then quiet)"),
    "tp1_gbit_s": ("Gbit/s", "higher", "iperf3, 1 stream"),
    "tp8_gbit_s": ("Gbit/s", "higher", "iperf3, 8 streams"),
    "rps_req_s": ("req/s", "higher", "wrk -t2 -c64, keep-alive"),
    "rps_p99_ms": ("ms", "lower", "p99 latency of the keep-alive load"),
    "cps_conn_s": ("conn/s", "higher", "wrk -t2 -c64 with Connection: close"),
    "tls_hs_s": ("handshakes/s", "higher", "wrk over https with Connection: close: full TLS handshakes"),
    "tls_bulk_gbit_s": ("Gbit/s", "higher", "one curl download of the backend's large file over TLS"),
    "cpu_tp1_ms_per_gb": ("ms/GB", "lower", "proxy CPU (user + system) per GB, 1 iperf3 stream"),
    "cpu_rps_us_per_req": ("us/request", "lower", "proxy CPU per keep-alive request"),
    "cpu_cps_us_per_conn": ("us/connection", "lower", "proxy CPU per new connection"),
    "cpu_tls_hs_us_per_hs": ("us/handshake", "lower", "proxy CPU per full TLS handshake"),
    "cpu_tls_bulk_ms_per_gb": ("ms/GB", "lower", "proxy CPU per GB of the TLS download"),
}
SCALING_METRICS = ("tp8_gbit_s", "rps_req_s", "cps_conn_s", "tls_hs_s", "cpu_rps_us_per_req",
                   "cpu_cps_us_per_conn")
LOADS = ("idle", "tp", "rps", "cps", "tls", "scaling", "tail", "syscalls")  # --measure's names
# The loads `tail` and `syscalls` run once per proxy (not per run, and not for the baseline).
TAIL_TARGETS = ("apilb", "haproxy", "nginx")
SYSCALL_TARGETS = ("apilb", "haproxy", "nginx")


# === Processes ===

started = []  # processes this script started, ended by PID at exit


def start(cmd, cpu, name, tmp):
    """Starts `cmd` pinned to `cpu`, its output appended to {tmp}/{name}.log."""
    log = os.path.join(tmp, f"{name}.log")
    with open(log, "ab") as out:
        p = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    p.name, p.log = name, log
    started.append(p)
    return p


def stop(p):
    """Ends one process this script started, by PID: SIGTERM, then SIGKILL after 15 s."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)


def stop_all():
    end_all(started)


def wait_ports(p, ports, timeout=20):
    """Waits until `p` accepts connections on every port; fails early if it exits."""
    end = time.time() + timeout
    for port in ports:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited with status {p.returncode} before listening on "
                                   f"127.0.0.1:{port}; its log:\n{log_tail(p.log)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > end:
                    raise RuntimeError(f"{p.name}: nothing listens on 127.0.0.1:{port} after {timeout} s; "
                                       f"its log:\n{log_tail(p.log)}") from None
                time.sleep(0.05)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# === Ports ===

class Ports:
    """Free loopback ports, one per listener for each group (the backends, each proxy), all
    allocated up front: the kernel picks each (bind 127.0.0.1:0), and each stays bound, never
    listening, until `take` releases its group just before the process that listens on it
    starts. While held, a port cannot be taken by a stray service, nor by the kernel as the
    source port of one of this run's own many outgoing connections, which come from the same
    ephemeral range: one such connection closed from its client side leaves a TIME_WAIT socket
    on the port that makes a later listen on it fail with EADDRINUSE, SO_REUSEADDR or not."""

    def __init__(self, groups):
        self._held = {}
        self.map = {g: {l.name: self._reserve() for l in LISTENERS} for g in groups}

    def _reserve(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        self._held[port] = s
        return port

    def take(self, group):
        """The group's ports (listener name -> port), released for the process about to
        listen on them (a proxy's later restarts reuse them)."""
        for port in self.map[group].values():
            s = self._held.pop(port, None)
            if s:
                s.close()
        return self.map[group]

    def close(self):
        for s in self._held.values():
            s.close()
        self._held.clear()


# === Certificates ===

def make_pki(tmp):
    """A CA and an ECDSA P-256 server certificate for localhost/127.0.0.1, made with openssl:
    every TLS side (nginx backend, and each proxy's terminating listener) uses the same pair."""
    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)
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


# === Configs (each derived from LISTENERS) ===

def nginx_config(tmp, name, connections, body, preamble=""):
    """One nginx with one worker, in the foreground, its files in `tmp` under `name`."""
    return f"""{preamble}
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.log;
daemon off;
worker_rlimit_nofile 20000;
events {{ worker_connections {connections}; }}
{body}"""


def backend_nginx_config(args, backend):
    pki, servers = args.pki, []
    for l in LISTENERS:
        if l.backend != "nginx":
            continue
        tls = (f"\n    ssl_certificate {pki['server.pem']};\n    ssl_certificate_key {pki['server.key']};"
               f"\n    ssl_protocols TLSv1.2 TLSv1.3;") if l.tls else ""
        extra = f"\n    {l.nginx.replace('{tmp}', args.tmp)}" if l.nginx else ""
        servers.append(f"""
  server {{
    listen 127.0.0.1:{backend[l.name]}{' ssl' if l.tls else ''} backlog=4096;{tls}{extra}
    location / {{ return 200 "{BODY}"; }}
  }}""")
    return nginx_config(args.tmp, "backend-nginx", 16000, f"""
http {{
  access_log off;
  keepalive_requests 1000000;{''.join(servers)}
}}
""")


def apilb_config(args, listen, backend, routes=False):
    pki, out = args.pki, []
    for l in LISTENERS:
        out.append(f'[[pool]]\nname = "{l.name}"\n[pool.health]\ninterval = "10s"\n')
        if l.tls:
            out.append(f'[pool.tls]\nca = "{pki["ca.pem"]}"\nserver_name = "localhost"\n')
        out.append(f'[[pool.backend]]\naddress = "127.0.0.1:{backend[l.name]}"\n')
    for l in LISTENERS:
        out.append(f'[[listener]]\nname = "{l.name}"\nlisten = "127.0.0.1:{listen[l.name]}"\npool = "{l.name}"\n')
        if l.tls:
            out.append(f'mode = "terminate"\n[listener.tls]\ncert = "{pki["server.pem"]}"\nkey = "{pki["server.key"]}"\n')
        elif routes:
            out.append(f'[[listener.route]]\nsni = ["elsewhere.example"]\npool = "{l.name}"\n')
    return "".join(out)


def haproxy_config(args, listen, backend, splice=False):
    pki, sections = args.pki, []
    for l in LISTENERS:
        bind = f" ssl crt {pki['combined.pem']}" if l.tls else ""
        server = f" ssl verify required ca-file {pki['ca.pem']} sni str(localhost)" if l.tls else ""
        sections.append(f"listen {l.name}\n  bind 127.0.0.1:{listen[l.name]}{bind}\n"
                        f"  server b 127.0.0.1:{backend[l.name]}{server}\n")
    return f"""
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
{''.join(sections)}"""


def nginx_stream_config(args, listen, backend, name="proxy-nginx"):
    pki, servers = args.pki, []
    for l in LISTENERS:
        if not l.tls:
            servers.append(f"  server {{ listen 127.0.0.1:{listen[l.name]} backlog=4096; "
                           f"proxy_pass 127.0.0.1:{backend[l.name]}; }}\n")
            continue
        servers.append(f"""  server {{
    listen 127.0.0.1:{listen[l.name]} ssl backlog=4096;
    ssl_certificate {pki['server.pem']};
    ssl_certificate_key {pki['server.key']};
    ssl_protocols TLSv1.2 TLSv1.3;
    proxy_pass 127.0.0.1:{backend[l.name]};
    proxy_ssl on;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {pki['ca.pem']};
    proxy_ssl_name localhost;
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
  }}
""")
    mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
    load = f"load_module {mod};" if os.path.exists(mod) else ""
    return nginx_config(args.tmp, name, 19500, f"""
stream {{
  proxy_timeout 1h;
{''.join(servers)}}}
""", preamble=load)


def write(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# === Backends and proxies ===

def start_backends(args, backend, big_mib):
    tmp = args.tmp
    # The bulk TLS download: a sparse file, so the backend's disk is not what is measured.
    with open(os.path.join(tmp, "big"), "wb") as f:
        f.truncate(big_mib << 20)
    # nginx's workers drop root: they must be able to reach the file.
    os.chmod(tmp, 0o755)
    os.chmod(os.path.join(tmp, "big"), 0o644)
    waits = []
    for l in LISTENERS:
        if l.backend == "iperf3":
            p = start(["iperf3", "-s", "-p", str(backend[l.name])], LOAD_CPU, f"backend-iperf3-{l.name}", tmp)
            waits.append((p, [backend[l.name]]))
        elif l.backend != "nginx":
            raise ValueError(f"listener {l.name}: unknown backend {l.backend!r}")
    nginx_ports = [backend[l.name] for l in LISTENERS if l.backend == "nginx"]
    if nginx_ports:
        conf = write(tmp, "backend-nginx.conf", backend_nginx_config(args, backend))
        p = start(["nginx", "-c", conf, "-e", f"{tmp}/backend-nginx.log"], LOAD_CPU, "backend-nginx", tmp)
        waits.append((p, nginx_ports))
    for p, ports in waits:
        wait_ports(p, ports)


def start_proxy(args, target, listen, backend, threads=1, cpu=PROXY_CPU):
    """Starts one proxy on `listen` (listener name -> port) in front of `backend`, and waits
    until every listener accepts connections."""
    tmp, name = args.tmp, target.key
    if target.proxy == "apilb":
        conf = write(tmp, f"{name}.toml", apilb_config(args, listen, backend, **target.options))
        cmd = [args.binary, "run", "--threads", str(threads), "--log-level", "warn", "--config", conf]
    elif target.proxy == "haproxy":
        conf = write(tmp, f"{name}.cfg", haproxy_config(args, listen, backend, **target.options))
        cmd = ["haproxy", "-db", "-f", conf]
    elif target.proxy == "nginx":
        conf = write(tmp, f"{name}.conf", nginx_stream_config(args, listen, backend, name, **target.options))
        cmd = ["nginx", "-c", conf, "-e", f"{tmp}/{name}.log"]
    else:
        raise ValueError(f"target {name}: unknown proxy {target.proxy!r}")
    p = start(cmd, cpu, name, tmp)
    wait_ports(p, [listen[l.name] for l in LISTENERS])
    return p


# === Loads ===

def iperf(port, streams, secs, cpu=LOAD_CPU):
    """iperf3 to `port` for `secs` s: Gbit/s received."""
    out = subprocess.run(["taskset", "-c", cpu, "iperf3", "-c", "127.0.0.1", "-p", str(port),
                          "-t", str(secs), "-P", str(streams), "-J"],
                         capture_output=True, text=True, timeout=secs + 30)
    try:
        data = json.loads(out.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 through port {port}: no result (status {out.returncode}): "
                           f"{out.stderr.strip()[-500:]}") from None
    if "error" in data:
        raise RuntimeError(f"iperf3 through port {port}: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(port, secs, close, scheme="http", cpu=LOAD_CPU):
    """wrk -t2 -c64 against `port` for `secs` s: (requests/s, p99 ms)."""
    cmd = ["taskset", "-c", cpu, "wrk", "-t2", "-c64", f"-d{secs}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"{scheme}://127.0.0.1:{port}/")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not rps:
        raise RuntimeError(f"wrk against {scheme}://127.0.0.1:{port}/: no result (status {out.returncode}): "
                           f"{(out.stdout + out.stderr).strip()[-500:]}")
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out.stdout)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else None
    return float(rps.group(1)), p99


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
    """RSS growth of the proxy per idle proxied connection, in KiB. Each connection sends one
    request first (its answer stays unread), as a watch does, so every proxy has connected it
    to the backend and relayed both ways: an idle watch, not a client that never spoke (which
    apilb does not connect before `first_byte_timeout`)."""
    time.sleep(0.5)
    before = rss_kib(pid)
    socks = []
    try:
        for n in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
            if n % 500 == 499:
                time.sleep(0.05)  # let the proxy accept and connect
        # The answer on a sample, so the connections are known to be proxied end to end.
        probe = socks[-1]
        probe.settimeout(5)
        if b"200" not in probe.recv(4096):
            raise RuntimeError(f"idle connections through port {port}: the probe request got no 200")
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


# wrk's `done` hook: the percentiles --latency leaves out, in microseconds, on one line.
TAIL_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("TAIL p99=%d p999=%d max=%d requests=%d errors=%d\\n",
    latency:percentile(99), latency:percentile(99.9), latency.max, summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status
    + summary.errors.timeout))
end
"""


def tail(port, runs, secs, tmp):
    """`runs` keep-alive loads of `secs` s (wrk -t2 -c64) against one running proxy: each
    run's p99, p99.9 and maximum latency in ms, and the worst of each over the runs."""
    script = write(tmp, "tail.lua", TAIL_LUA)
    each = []
    for _ in range(runs):
        cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t2", "-c64", f"-d{secs}s", "-s", script,
               f"http://127.0.0.1:{port}/"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
        m = re.search(r"TAIL p99=(\d+) p999=(\d+) max=(\d+) requests=(\d+) errors=(\d+)", out.stdout)
        if not m:
            raise RuntimeError(f"wrk (tail) against port {port}: no result (status {out.returncode}): "
                               f"{(out.stdout + out.stderr).strip()[-500:]}")
        p99, p999, mx, n, errors = (int(x) for x in m.groups())
        if errors:
            raise RuntimeError(f"wrk (tail) against port {port}: {errors} errors in {n} requests")
        each.append({"p99_ms": p99 / 1e3, "p999_ms": p999 / 1e3, "max_ms": mx / 1e3, "req_s": n / secs})
    return {
        "runs": each,
        "worst_p99_ms": max(r["p99_ms"] for r in each),
        "median_p99_ms": sorted(r["p99_ms"] for r in each)[len(each) // 2],
        "worst_p999_ms": max(r["p999_ms"] for r in each),
        "worst_max_ms": max(r["max_ms"] for r in each),
    }


def family(pid):
    """Every thread of `pid` and of its descendants (nginx's workers are children)."""
    tids, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids += [int(t) for t in os.listdir(f"/proc/{p}/task")]
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return tids


def close_requests(port, n, workers=8, keepalive=False):
    """`n` requests for the 100-byte body from `workers` threads: each on a connection of its
    own with `Connection: close` (the server closes, then the client), or, with `keepalive`,
    over one connection per thread. Fails unless every answer is a 200."""
    import threading
    errors = []
    req_close = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    req_ka = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    def close_loop(count):
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(req_close)
                got = b""
                while True:
                    b = s.recv(4096)
                    if not b:
                        break
                    got += b
                if not got.startswith(b"HTTP/1.1 200"):
                    errors.append(got[:80])

    def ka_loop(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for _ in range(count):
                s.sendall(req_ka)
                got = b""
                while not (got.endswith(BODY.encode()) and b"\r\n\r\n" in got):
                    b = s.recv(4096)
                    if not b:
                        errors.append(b"closed early")
                        return
                    got += b
                if not got.startswith(b"HTTP/1.1 200"):
                    errors.append(got[:80])

    loop = ka_loop if keepalive else close_loop
    threads = [threading.Thread(target=loop, args=(n // workers + (i < n % workers),)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests through port {port} failed: {errors[:3]}")


def strace_counts(path):
    """strace -c's table: syscall name -> calls."""
    calls = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            # "% time seconds usecs/call calls [errors] syscall"
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                try:
                    calls[parts[-1]] = int(parts[3])
                except ValueError:
                    pass
    return calls


def count_syscalls(pid, port, n, tmp, name, keepalive):
    """The proxy's system calls per request over `n` requests (strace -c attached to every
    thread of it): with `Connection: close`, so per new connection, or over keep-alive
    connections. strace slows the proxy down: these are counts, not speeds."""
    out = os.path.join(tmp, f"strace-{name}-{'ka' if keepalive else 'close'}.txt")
    cmd = ["strace", "-c", "-f", "-q", "-o", out]
    for tid in family(pid):
        cmd += ["-p", str(tid)]
    st = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started.append(st)
    try:
        time.sleep(1.0)  # strace attaches to each thread in turn
        if keepalive:
            # The connections are opened outside the count's window only roughly: 8 of n.
            close_requests(port, n, keepalive=True)
        else:
            close_requests(port, n)
        time.sleep(0.5)
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
    calls = strace_counts(out)
    if not calls:
        raise RuntimeError(f"strace attached to {name} counted nothing: {st.stderr.read()[-500:]!r}")
    return {k: v / n for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}


def show(r):
    return {k: round(v, 4) for k, v in r.items() if v is not None}


def measure(label, ports, pid, args):
    """One run of the chosen loads through `ports` (listener name -> port): METRICS key ->
    number, None where not measured. `pid` is the proxy's (None for the baseline)."""
    r = dict.fromkeys(METRICS)
    want = args.want

    def timed(fn, rate, cpu_key, scale):
        """Runs one load; with a proxy, also records its CPU time per unit of work into
        `cpu_key`: `rate` gives the load's units of work per second from its result, `scale`
        converts seconds per unit to the key's unit."""
        if pid:
            c0, t0 = cpu_seconds(pid), time.time()
        out = fn()
        if pid and rate(out):
            r[cpu_key] = (cpu_seconds(pid) - c0) / (rate(out) * (time.time() - t0)) * scale
        return out

    gbytes = lambda gbit_s: gbit_s / 8  # noqa: E731 (GB per second from Gbit/s)
    first = lambda out: out[0]  # noqa: E731 (requests per second from wrk's result)
    # Idle memory first, on a proxy that has not yet grown its pools under load: RSS growth
    # is only meaningful from a cold start (later runs reuse memory the load left behind).
    if pid and "idle" in want:
        r["idle_kib_per_conn"] = idle_memory(pid, ports["idle"], args.idle)
    if "tp" in want:
        r["tp1_gbit_s"] = timed(lambda: iperf(ports["throughput"], 1, args.secs), gbytes, "cpu_tp1_ms_per_gb", 1e3)
        r["tp8_gbit_s"] = iperf(ports["throughput"], 8, args.secs)
    if "rps" in want:
        r["rps_req_s"], r["rps_p99_ms"] = timed(lambda: wrk(ports["http"], args.secs, close=False),
                                                first, "cpu_rps_us_per_req", 1e6)
    if "cps" in want:
        r["cps_conn_s"], _ = timed(lambda: wrk(ports["http"], args.secs, close=True),
                                   first, "cpu_cps_us_per_conn", 1e6)
    if "tls" in want:
        # A full handshake per connection: wrk does not resume TLS sessions.
        r["tls_hs_s"], _ = timed(lambda: wrk(ports["tls"], args.secs, close=True, scheme="https"),
                                 first, "cpu_tls_hs_us_per_hs", 1e6)
        r["tls_bulk_gbit_s"] = timed(lambda: tls_download(ports["tls"]), gbytes, "cpu_tls_bulk_ms_per_gb", 1e3)
    print(f"  {label}: {show(r)}", file=sys.stderr, flush=True)
    return r


def measure_extras(args, ports, backend):
    """The loads that run once per proxy, on one start of it: `tail` (many keep-alive runs)
    and `syscalls` (strace's counts per new connection and per keep-alive request)."""
    out = {"tail": {}, "syscalls": {}}
    if not args.want & {"tail", "syscalls"}:
        return out
    for t in TARGETS:
        if t.key not in TAIL_TARGETS + SYSCALL_TARGETS or (args.only and args.only != t.key):
            continue
        listen = ports.take(t.key)
        p = start_proxy(args, t, listen, backend)
        try:
            if "tail" in args.want and t.key in TAIL_TARGETS:
                out["tail"][t.key] = tail(listen["http"], args.tail_runs, args.secs, args.tmp)
                print(f"  {t.label} tail: {show({k: v for k, v in out['tail'][t.key].items() if k != 'runs'})}",
                      file=sys.stderr, flush=True)
            if "syscalls" in args.want and t.key in SYSCALL_TARGETS:
                out["syscalls"][t.key] = {
                    "per_connection": count_syscalls(p.pid, listen["http"], args.syscall_requests, args.tmp,
                                                     t.key, keepalive=False),
                    "per_request": count_syscalls(p.pid, listen["http"], args.syscall_requests, args.tmp,
                                                  t.key, keepalive=True),
                }
                print(f"  {t.label} syscalls per connection: "
                      f"{sum(out['syscalls'][t.key]['per_connection'].values()):.1f}, per keep-alive request: "
                      f"{sum(out['syscalls'][t.key]['per_request'].values()):.2f}", file=sys.stderr, flush=True)
        finally:
            stop(p)
    return out


def median_runs(fn, runs):
    """`runs` runs of `fn`: {"runs": each run's figures, "median": each figure's median}."""
    results = [fn() for _ in range(runs)]
    median = {}
    for k in results[0]:
        vals = sorted(v[k] for v in results if v[k] is not None)
        median[k] = vals[len(vals) // 2] if vals else None
    return {"runs": results, "median": median}


def measure_scaling(args, listen, backend):
    """apilb with 1 and then 2 worker threads, nothing pinned (the proxy, the loads and the
    backends share both cores): does the work spread over threads?"""
    out = {}
    for threads in (1, 2):
        p = start_proxy(args, SCALING, listen, backend, threads=threads, cpu="0,1")

        def cpu_per(load):
            """(rate, proxy CPU us per unit of work) of one wrk load."""
            c0, t0 = cpu_seconds(p.pid), time.time()
            rate = load()[0]
            return rate, (cpu_seconds(p.pid) - c0) / (rate * (time.time() - t0)) * 1e6 if rate else None
        try:
            r = {"tp8_gbit_s": iperf(listen["throughput"], 8, args.secs, cpu="0,1")}
            r["rps_req_s"], r["cpu_rps_us_per_req"] = cpu_per(
                lambda: wrk(listen["http"], args.secs, close=False, cpu="0,1"))
            r["cps_conn_s"], r["cpu_cps_us_per_conn"] = cpu_per(
                lambda: wrk(listen["http"], args.secs, close=True, cpu="0,1"))
            r["tls_hs_s"] = wrk(listen["tls"], args.secs, close=True, scheme="https", cpu="0,1")[0]
            out[threads] = r
            print(f"  apilb --threads {threads}, unpinned: {show(out[threads])}", file=sys.stderr, flush=True)
        finally:
            stop(p)
    return out


# === Results ===

def ratio(a, o, key):
    """a's figure over o's, None when either is missing or zero."""
    x, y = a.get(key), o.get(key)
    return x / y if x and y else None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def collect(results, scaling, args, ports):
    """Everything measured, as data: what the tables are rendered from and --json writes."""
    targets = {t.key: t for t in TARGETS}
    data = {
        "settings": {
            "quick": args.quick, "runs": args.runs, "secs": args.secs, "idle_connections": args.idle,
            "measure": sorted(args.want), "only": args.only, "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU,
            "tail_runs": args.tail_runs, "syscall_requests": args.syscall_requests,
            "binary": os.path.abspath(args.binary), "binary_sha256": args.binary_sha256,
        },
        "metrics": {k: {"unit": u, "better": b, "what": w} for k, (u, b, w) in METRICS.items()},
        "listeners": [{"name": l.name, "role": l.role, "backend": l.backend, "tls_terminated": l.tls}
                      for l in LISTENERS],
        "ports": ports.map,
        "targets": {k: {"label": targets[k].label, "median": r["median"], "runs": r["runs"]}
                    for k, r in results.items()},
        "ratios": {},
        "scaling": None,
    }
    a = results.get("apilb")
    if a:
        data["ratios"]["apilb_vs"] = {k: {m: ratio(a["median"], r["median"], m) for m in METRICS}
                                      for k, r in results.items() if k != "apilb"}
    if scaling:
        data["scaling"] = {"threads": {str(n): r for n, r in scaling.items()},
                           "ratio_2_vs_1": {m: ratio(scaling[2], scaling[1], m) for m in SCALING_METRICS}}
    return data


# The tables' columns: (METRICS key, header in the figures table, header in the ratio table, decimals).
PASSTHROUGH_COLUMNS = (
    ("tp1_gbit_s", "1-stream Gbit/s", "1-stream", 1),
    ("tp8_gbit_s", "8-stream Gbit/s", "8-stream", 1),
    ("rps_req_s", "keep-alive req/s", "keep-alive req/s", 0),
    ("rps_p99_ms", "p99 ms", "p99 (lower is better)", 2),
    ("cps_conn_s", "new conn/s", "new conn/s", 0),
    ("idle_kib_per_conn", "KiB per idle conn", "idle KiB (lower is better)", 1),
)
TLS_COLUMNS = (
    ("tls_hs_s", "full TLS handshakes/s", "handshakes/s", 0),
    ("tls_bulk_gbit_s", "TLS bulk Gbit/s", "TLS bulk", 1),
)
CPU_COLUMNS = (
    ("cpu_tp1_ms_per_gb", "ms per GB (1 stream)", "per GB", 0),
    ("cpu_rps_us_per_req", "us per keep-alive request", "per request", 1),
    ("cpu_cps_us_per_conn", "us per new connection", "per new connection", 1),
    ("cpu_tls_hs_us_per_hs", "us per TLS handshake", "per TLS handshake", 0),
    ("cpu_tls_bulk_ms_per_gb", "ms per GB TLS bulk", "per GB TLS", 0),
)
SCALING_COLUMNS = (
    ("tp8_gbit_s", "8-stream Gbit/s", None, 1),
    ("rps_req_s", "keep-alive req/s", None, 0),
    ("cps_conn_s", "new conn/s", None, 0),
    ("tls_hs_s", "full TLS handshakes/s", None, 0),
    ("cpu_rps_us_per_req", "us CPU per keep-alive request", None, 1),
    ("cpu_cps_us_per_conn", "us CPU per new connection", None, 1),
)


def fmt(v, d=1):
    return "-" if v is None else f"{v:,.{d}f}"


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def figures(first, columns, rows):
    """A figures table: `rows` are (label, figures)."""
    return table([first] + [c[1] for c in columns],
                 [[label] + [fmt(r.get(c[0]), c[3]) for c in columns] for label, r in rows])


def ratios(first, columns, rows):
    """A ratio table: `rows` are (label, ratios)."""
    return table([first] + [c[2] for c in columns],
                 [[label] + [fmt_ratio(r.get(c[0])) for c in columns] for label, r in rows])


def render(data):
    """The markdown report, from `collect`'s data alone."""
    s = data["settings"]
    targets = [(t, data["targets"][t.key]["median"]) for t in TARGETS if t.key in data["targets"]]
    vs = data["ratios"].get("apilb_vs", {})
    # apilb's ratio tables: against the baseline and every other proxy measured, when there is one.
    others = [(t, vs[t.key]) for t, _ in targets if t.key in vs]
    show_vs = "apilb" in data["targets"] and len(others) > 1
    out = [f"\n{'Quick smoke run: figures are not meaningful.' if s['quick'] else ''}",
           f"Loopback, proxy alone on CPU {s['proxy_cpu']} with one worker, load and backends on CPU {s['load_cpu']}; "
           f"median of {s['runs']} run(s) of {s['secs']}s; idle memory over {s['idle_connections']} connections.\n",
           "Passthrough (HAProxy and nginx in plain TCP mode):\n"]
    out += figures("target", PASSTHROUGH_COLUMNS, [(t.label, r) for t, r in targets])
    if show_vs:
        out += [""] + ratios("apilb vs", PASSTHROUGH_COLUMNS, [(t.vs_label, r) for t, r in others])

    if any(r.get("tls_hs_s") for _, r in targets):
        out += ["\nTerminating TLS (ECDSA P-256 certificate; the proxy re-encrypts to an nginx TLS backend, "
                "verifying it): full handshakes/s is wrk with `Connection: close` (no session resumption), "
                "bulk is one curl download of the backend's large file.\n"]
        out += figures("target", TLS_COLUMNS, [(t.tls_label, r) for t, r in targets if t.tls_rows])
        if show_vs:
            out += [""] + ratios("apilb vs", TLS_COLUMNS, [(t.tls_vs_label, r) for t, r in others if t.tls_rows])

    if any(r.get("cpu_cps_us_per_conn") or r.get("cpu_tls_hs_us_per_hs") for _, r in targets):
        out += ["\nProxy CPU per unit of work (user + system, including the kernel's loopback TCP work done "
                "in the proxy's system calls; lower is better). On this machine the load generators and "
                "backends often saturate their core first, so these show the proxies' headroom where the "
                "rates above cannot.\n"]
        out += figures("target", CPU_COLUMNS, [(t.label, r) for t, r in targets if t.proxy])
        if show_vs:
            out += [""] + ratios("apilb's CPU vs", CPU_COLUMNS, [(t.vs_label, r) for t, r in others if t.proxy])

    labels = {t.key: t.label for t in TARGETS}
    tl = data.get("tail") or {}
    if tl:
        n = len(next(iter(tl.values()))["runs"])
        out += [f"\nTail: {n} keep-alive runs of {s['secs']}s per proxy (wrk -t2 -c64, pinned as above), one "
                "start of each proxy; percentiles from wrk's latency histogram.\n"]
        cols = (("median_p99_ms", "median p99 ms"), ("worst_p99_ms", "worst p99 ms"),
                ("worst_p999_ms", "worst p99.9 ms"), ("worst_max_ms", "worst max ms"))
        out += table(["target"] + [c[1] for c in cols],
                     [[labels[k]] + [fmt(r[c[0]], 2) for c in cols] for k, r in tl.items()])
        if "apilb" in tl:
            out += [""] + table(["apilb vs"] + [c[1] for c in cols],
                                [[labels[k]] + [fmt_ratio(ratio(tl["apilb"], r, c[0])) for c in cols]
                                 for k, r in tl.items() if k != "apilb"])
    sy = data.get("syscalls") or {}
    if sy:
        out += [f"\nSystem calls of the proxy (strace -c on every thread) per new connection ({s['syscall_requests']:,} "
                "requests with `Connection: close`) and per keep-alive request (the same number over 8 connections); "
                "strace slows the proxy, so these are counts, not speeds.\n"]
        keys = list(sy)
        names = sorted({c for r in sy.values() for c in r["per_connection"]} |
                       {c for r in sy.values() for c in r["per_request"]},
                       key=lambda c: -max(r["per_connection"].get(c, 0) for r in sy.values()))
        head = ["system call"] + [f"{labels[k]} per conn" for k in keys] + [f"{labels[k]} per req" for k in keys]
        rows = []
        for c in names:
            vals = [sy[k]["per_connection"].get(c, 0) for k in keys] + [sy[k]["per_request"].get(c, 0) for k in keys]
            if max(vals) >= 0.05:
                rows.append([c] + [fmt(v, 2) if v else "-" for v in vals])
        rows.append(["**total**"] + [f"**{sum(sy[k]['per_connection'].values()):.1f}**" for k in keys]
                    + [f"**{sum(sy[k]['per_request'].values()):.2f}**" for k in keys])
        out += table(head, rows)

    sc = data["scaling"]
    if sc:
        out += [f"\nScaling: apilb `--threads 1` and `--threads 2`, nothing pinned (proxy, loads and backends "
                f"share the 2 cores); one run of {s['secs']}s each.\n"]
        rows = figures("apilb worker threads", SCALING_COLUMNS, [(n, sc["threads"][n]) for n in ("1", "2")])
        rows.append("| 2 vs 1 | " + " | ".join(fmt_ratio(sc["ratio_2_vs_1"].get(c[0])) for c in SCALING_COLUMNS) + " |")
        out += rows
    return "\n".join(out)


# === Main ===

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short loads, few idle connections")
    ap.add_argument("--runs", type=int, default=3, help="runs per target; the median is reported")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/apilb"))
    ap.add_argument("--only", choices=[t.key for t in TARGETS if t.proxy],
                    help="measure only this proxy and the baseline")
    ap.add_argument("--idle", type=int, help="idle connections for the memory figure (default 9500; --quick: 500)")
    ap.add_argument("--measure", default=",".join(LOADS),
                    help="comma-separated subset of: idle, tp (iperf3), rps (keep-alive), cps (new connections), "
                         "tls (terminating listener: handshakes and bulk), scaling (apilb, 1 vs 2 threads), "
                         "tail (ten keep-alive runs per proxy: worst p99, p99.9, max), "
                         "syscalls (strace -c: system calls per new connection and per request)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures of every run, the medians and the ratios "
                                                   "to FILE as JSON")
    args = ap.parse_args()
    args.secs = 1 if args.quick else 5
    args.tail_runs = 2 if args.quick else 10
    args.syscall_requests = 500 if args.quick else 10000
    args.idle = args.idle or (500 if args.quick else 9500)
    if args.quick:
        args.runs = 1
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    args.want = set(filter(None, args.measure.split(",")))
    if args.want - set(LOADS):
        ap.error(f"--measure: unknown {', '.join(sorted(args.want - set(LOADS)))} (known: {', '.join(LOADS)})")
    tools = ["haproxy", "nginx", "iperf3", "wrk", "taskset", "openssl", "curl"]
    if "syscalls" in args.want:
        tools.append("strace")
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run benches/compare.sh, which installs it")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary} is not an executable: build it (cargo build --release) or pass --binary")
    args.binary_sha256 = file_sha256(args.binary)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    atexit.register(stop_all)
    args.tmp = tmp = tempfile.mkdtemp(prefix="apilb-compare-")
    ports = Ports(["backend"] + [t.key for t in TARGETS if t.proxy] + [SCALING.key])
    results = {}
    scaling = None
    extras = {"tail": {}, "syscalls": {}}
    try:
        args.pki = make_pki(tmp)
        backend = ports.take("backend")
        start_backends(args, backend, 32 if args.quick else 1024)
        print("measuring (proxy on CPU 0, load and backends on CPU 1)...", file=sys.stderr, flush=True)
        for t in TARGETS:
            if t.proxy is None:
                results[t.key] = median_runs(lambda t=t: measure(t.vs_label, backend, None, args), args.runs)
                continue
            if args.only and args.only != t.key:
                continue
            listen = ports.take(t.key)

            def one_run(t=t, listen=listen):
                p = start_proxy(args, t, listen, backend)
                try:
                    return measure(t.label, listen, p.pid, args)
                finally:
                    stop(p)
            results[t.key] = median_runs(one_run, args.runs)
        extras = measure_extras(args, ports, backend)
        if "scaling" in args.want:
            scaling = measure_scaling(args, ports.take(SCALING.key), backend)
    finally:
        stop_all()
        ports.close()
        shutil.rmtree(tmp, ignore_errors=True)
    data = collect(results, scaling, args, ports)
    data["tail"], data["syscalls"] = extras["tail"], extras["syscalls"]
    print(render(data))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
