#!/usr/bin/env python3
"""Small GETs through apilb's front-proxy identity mode (SPEC §10) against HAProxy `mode http`
and nginx `proxy_pass`, each set up to do the same per request: strip the identity headers a
client sent, set X-Forwarded-For, and forward over kept-alive TLS connections to an HTTPS
backend (nginx, HTTP/2 and HTTP/1.1).

The proxy runs alone on CPU 0 with one worker (apilb --threads 1, HAProxy nbthread 1, nginx one
worker); wrk (HTTP/1.1 keep-alive over TLS, -t2 -c64) and the backend share CPU 1. Figures:
requests/s, p99, and the proxy's CPU (user + system) per request, the median of --runs runs.
wrk presents no client certificate, so every proxy takes its path for token users (no
identity headers set, no certificate towards the backend): the header work and the proxying
are what is compared. HTTP/2 from the client is not measured here (no h2 load generator on
this machine).

  python3 benches/identity.py            # 3 runs of 5 s each
  python3 benches/identity.py --quick    # smoke: 1 run of 1 s (CI)
"""

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the shared process, PKI and load helpers)
from harness import on_signal  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def front_proxy_identity(tmp, pki):
    """A client certificate from a CA of its own: the gateway's front-proxy identity."""
    k = {n: os.path.join(tmp, n) for n in ("fp-ca.pem", "fp-ca.key", "fp.pem", "fp.key", "fp.csr", "fp.cnf")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)
    ossl("req", "-x509", *ec, "-keyout", k["fp-ca.key"], "-out", k["fp-ca.pem"], "-days", "2",
         "-subj", "/CN=front-proxy-ca", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ossl("req", *ec, "-keyout", k["fp.key"], "-out", k["fp.csr"], "-subj", "/CN=front-proxy-client")
    with open(k["fp.cnf"], "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    ossl("x509", "-req", "-in", k["fp.csr"], "-CA", k["fp-ca.pem"], "-CAkey", k["fp-ca.key"],
         "-CAcreateserial", "-out", k["fp.pem"], "-days", "2", "-extfile", k["fp.cnf"])
    return k


def configs(tmp, pki, fp, backend, ports):
    apilb = f"""[[pool]]
name = "p"
[pool.health]
interval = "10s"
[pool.tls]
ca = "{pki['ca.pem']}"
server_name = "localhost"
[[pool.backend]]
address = "127.0.0.1:{backend}"
[[listener]]
name = "identity"
listen = "127.0.0.1:{ports['apilb']}"
mode = "terminate"
pool = "p"
[listener.tls]
cert = "{pki['server.pem']}"
key = "{pki['server.key']}"
[listener.identity]
client_cert = "{fp['fp.pem']}"
client_key = "{fp['fp.key']}"
"""
    haproxy = f"""
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 2s
  timeout client 1h
  timeout server 1h
  option http-keep-alive
frontend identity
  bind 127.0.0.1:{ports['haproxy']} ssl crt {pki['combined.pem']} alpn h2,http/1.1
  http-request del-header X-Remote-User
  http-request del-header X-Remote-Group
  http-request del-header ^X-Remote-Extra- -m beg
  http-request set-header X-Forwarded-For %[src]
  default_backend apiservers
backend apiservers
  http-reuse always
  server b 127.0.0.1:{backend} ssl verify required ca-file {pki['ca.pem']} sni str(localhost) alpn h2
"""
    nginx = compare.nginx_config(tmp, "proxy-nginx", 9000, f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream apiservers {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{ports['nginx']} ssl http2 backlog=4096;
    ssl_certificate {pki['server.pem']};
    ssl_certificate_key {pki['server.key']};
    location / {{
      proxy_pass https://apiservers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Remote-User "";
      proxy_set_header X-Remote-Group "";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {pki['ca.pem']};
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }}
  }}
}}
""")
    backend_conf = compare.nginx_config(tmp, "backend-nginx", 9000, f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{backend} ssl http2 backlog=4096;
    ssl_certificate {pki['server.pem']};
    ssl_certificate_key {pki['server.key']};
    location / {{ return 200 "{compare.BODY}"; }}
  }}
}}
""")
    return apilb, haproxy, nginx, backend_conf


def measure(name, port, pid, secs):
    # The path works end to end before it is timed: the backend's body, through the proxy.
    out = subprocess.run(["curl", "-sk", "--fail", f"https://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or out.stdout != compare.BODY:
        raise RuntimeError(f"{name}: GET / through the proxy gave {out.returncode}: {out.stdout[:200]!r} {out.stderr[:200]}")
    before = compare.cpu_seconds(pid)
    rps, p99 = compare.wrk(port, secs, close=False, scheme="https")
    used = compare.cpu_seconds(pid) - before
    return {"rps": rps, "p99_ms": p99, "cpu_us_per_req": used / max(1.0, rps * secs) * 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/apilb"))
    args = ap.parse_args()
    secs, runs = (1, 1) if args.quick else (5, args.runs)
    for tool in ("haproxy", "nginx", "wrk", "taskset", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run benches/compare.sh, which installs it")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    atexit.register(compare.stop_all)
    tmp = tempfile.mkdtemp(prefix="apilb-identity-")
    os.chmod(tmp, 0o755)
    results = {}
    try:
        pki = compare.make_pki(tmp)
        fp = front_proxy_identity(tmp, pki)
        backend = free_port()
        ports = {"apilb": free_port(), "haproxy": free_port(), "nginx": free_port()}
        apilb, haproxy, nginx, backend_conf = configs(tmp, pki, fp, backend, ports)
        b = compare.start(["nginx", "-c", compare.write(tmp, "backend.conf", backend_conf),
                           "-e", f"{tmp}/backend-nginx.log"], compare.LOAD_CPU, "backend-nginx", tmp)
        compare.wait_ports(b, [backend])
        cmds = {
            "apilb": [args.binary, "run", "--threads", "1", "--log-level", "warn",
                      "--config", compare.write(tmp, "apilb.toml", apilb)],
            "haproxy": ["haproxy", "-db", "-f", compare.write(tmp, "haproxy.cfg", haproxy)],
            "nginx": ["nginx", "-c", compare.write(tmp, "nginx.conf", nginx), "-e", f"{tmp}/proxy-nginx.log"],
        }
        for name, cmd in cmds.items():
            runs_of = []
            for _ in range(runs):
                p = compare.start(cmd, compare.PROXY_CPU, name, tmp)
                try:
                    compare.wait_ports(p, [ports[name]])
                    time.sleep(0.3)
                    runs_of.append(measure(name, ports[name], p.pid, secs))
                finally:
                    compare.stop(p)
            results[name] = {k: sorted(r[k] for r in runs_of)[len(runs_of) // 2] for k in runs_of[0]}
    finally:
        compare.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Identity mode, small GETs over HTTP/1.1 keep-alive TLS (wrk -t2 -c64), median of {runs} run(s) of {secs} s:\n")
    print("| proxy | req/s | p99 ms | us CPU per request |")
    print("|---|---|---|---|")
    label = {"apilb": "apilb identity mode", "haproxy": "HAProxy mode http", "nginx": "nginx proxy_pass"}
    for name, r in results.items():
        print(f"| {label[name]} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['cpu_us_per_req']:.1f} |")
    a = results.get("apilb")
    if a:
        print("\n| apilb vs | req/s | CPU per request (lower is better) |")
        print("|---|---|---|")
        for name in ("haproxy", "nginx"):
            o = results.get(name)
            if o:
                print(f"| {label[name]} | {a['rps'] / o['rps']:.2f}x | {a['cpu_us_per_req'] / o['cpu_us_per_req']:.2f}x |")


if __name__ == "__main__":
    main()
