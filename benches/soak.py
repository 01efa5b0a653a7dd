#!/usr/bin/env python3
"""Soak test: a mixed load through apilb for N minutes while faults are injected, then a
verdict. Exit 0 when no client failure was unexpected, no byte was corrupted and nothing
leaked; else 1 (2: bad arguments or a harness error before the load).

    python3 benches/soak.py --smoke                      # 60 s of load: what CI runs
    python3 benches/soak.py --minutes 10 --json out.json
    python3 benches/soak.py --binary /path/to/apilb      # default target/release/apilb

Python 3 standard library only, plus the `openssl` and `prlimit` commands (benches/soak.sh
installs them with apt-get when missing). Everything runs on 127.0.0.1; nothing is sent
anywhere else.

Topology. Six backends, each its own Python process (this script with `--serve`), so each
can be SIGKILLed, SIGSTOPped and restarted: p0-p2 plain TCP, t0-t2 TLS (certificate for
`kubernetes` from a throwaway backend CA). On accept a backend writes one line, its name,
then echoes every byte; SIGUSR1 makes it reset (SO_LINGER 0, RST) every connection it holds.
apilb in front: pool `plain` (tcp checks every 500ms, fall 2, rise 1) behind the passthrough
listener, pool `tls` (tls checks, `server_name = "kubernetes"`) behind the terminate
listener, whose certificate comes from a throwaway "public" CA (SAN localhost, 127.0.0.1),
and the admin server. Ports are free loopback ports the kernel hands out; each stays bound,
never listening, until the process that listens on it starts (see `Ports`).

Load (asyncio, bounded): WATCHES held connections per listener that send a small message
every 2 s and check its echo (a broken watch reconnects); short requests (connect, read the
backend's name, send 100-1000 random bytes, read them back) at SHORT_RATE per second in
total; one 4 MiB bulk echo at a time per listener, every byte compared and the sha256 too.
Through the terminate listener clients verify the public CA with server_name localhost and
ALPN http/1.1 (and check that the backend's http/1.1 came back). Besides: SLOWLORIS clients
per listener (silent on passthrough; silent or dribbling a ClientHello a byte every 3 s on
terminate), which the gateway must close after first_byte_timeout / handshake_timeout;
garbage bytes and bogus-ALPN ClientHellos on the terminate listener, which must fail.

Faults, from the end of the warm-up to TAIL seconds before the end: every FAULT_EVERY s a
backend is killed (restarted 2 s later), reset, or stopped for 3 s (SIGSTOP/SIGCONT), in a
cycle over every backend and kind; every 5 s a reload (the config rewritten atomically, then
SIGHUP; a third of them invalid), each checked in apilb_config_reloads_total; every 30 s a
rotation of the public certificate (new key and certificate from the same CA, renamed into
place: apilb watches files), checked by a client that must see the new certificate; every
30 s an EMFILE episode (`prlimit` lowers apilb's descriptor limit to just above what it
uses for 3 s, then restores it), followed by a probe that measures how soon it serves again.

Judging. Every client failure is recorded with its time span, its listener and, when the
backend's name was read, its backend. A failure is expected when a fault of that backend (or
of any backend of the listener's pool, when no name was read) overlaps it, with FAULT_GRACE
seconds after the fault ended, or an EMFILE episode does (EMFILE_GRACE); anything else is
unexpected (reloads and rotations must cause none). A corrupted byte, a wrong ALPN, a
slowloris the gateway does not close in time, garbage that is not closed or a bogus ALPN
that is accepted is never excused (except a slowloris delayed by an EMFILE episode, whose
accept waited). Leaks: apilb's open descriptors and RSS in an idle moment after the warm-up
(the baseline) and again 5-10 s after the load stopped: at most FD_MARGIN more descriptors
other than pipes; splice pipes within their pool's bound (PIPES_PER_WORKER per worker thread,
src/relay/splice.rs, so a pool that filled up under load is not taken for a leak); an RSS
within max(1.5 x baseline, baseline + 30 MiB). Also judged: every reload counted with its
result, every rotated certificate seen, an exit status 0 on SIGTERM at the end, and at least
one EMFILE episode that apilb really met (accept or local connect errors).

Structure: constants; processes (every one started here is ended by PID, also on SIGINT,
SIGTERM and SIGHUP, and dies with this process through PR_SET_PDEATHSIG); ports; PKI;
config text; the backend server (`--serve`); /proc and /metrics helpers; `Soak`, the run
(topology, loads, faults, measurements, all in one asyncio loop); judging and the report;
main. The temp folder (PKI, configs, every process's log) is removed after a passing run and
kept (its path printed) after a failing one or with --keep.
"""

import argparse
import asyncio
import atexit
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import end_all, log_tail, on_signal  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"  # the only address this script ever connects to or listens on

POOLS = {"plain": ("p0", "p1", "p2"), "tls": ("t0", "t1", "t2")}
BACKENDS = POOLS["plain"] + POOLS["tls"]
POOL_OF = {b: p for p, bs in POOLS.items() for b in bs}
LISTENERS = {"passthrough": "plain", "terminate": "tls"}  # listener -> its pool

# === Load ===
WATCHES = 50                 # held connections per listener
WATCH_EVERY = 2.0            # seconds between a watch's messages
SHORT_RATE = 100.0           # short requests per second, in total over both listeners
SHORT_INFLIGHT = 150         # per listener; a tick over it is skipped (and counted)
SHORT_SIZE = (100, 1000)
BULK_BYTES = 4 << 20
BULK_PAUSE = 0.5
SLOWLORIS = 100              # per listener, so 200 in all
DRIBBLE_EVERY = 3.0
PROBE_EVERY = 1.0            # one garbage and one bogus-ALPN client per second each

# === Gateway timeouts (written into the config, judged against) ===
FIRST_BYTE_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
SLOW_EARLY = 0.5             # a slowloris closed this much before its timeout is closed early
SLOW_SLACK = 5.0             # ... and this much after it, late
SLOW_GIVE_UP = 20.0          # ... and this much after it, not closed (the client gives up)
PROBE_CLOSE_WITHIN = 12.0    # garbage must be closed and a bogus ALPN refused within this

# === Faults ===
FAULT_EVERY = 4.0
KILL_DOWN = 2.0
STOP_FOR = 3.0
RESET_SPAN = 0.2
RELOAD_EVERY = 5.0
EMFILE_FOR = 3.0
EMFILE_HEADROOM = 2          # descriptor numbers left free below the lowered limit
FAULT_GRACE = 1.5            # a backend fault excuses failures this long after it ended
EMFILE_GRACE = 3.0

# === Client timeouts (generous: the machine is small and shared) ===
CONNECT_TIMEOUT = 10.0
OP_TIMEOUT = 15.0
ECHO_TIMEOUT = 10.0
BULK_TIMEOUT = 90.0

# === Leaks ===
FD_MARGIN = 20               # descriptors other than splice pipes
PIPES_PER_WORKER = 16        # src/relay/splice.rs KEEP: pipes a worker keeps pooled (2 descriptors each)
RSS_FACTOR = 1.5
RSS_EXTRA_KIB = 30 * 1024

EXAMPLES = 20  # unexpected failures kept in full in the report


# === Processes ===

STARTED = []  # every subprocess.Popen started here; ended by PID at exit

try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent():
    """In the child, before exec: SIGKILL when this script dies (even by SIGKILL), so no
    backend or gateway outlives it. Only ever forked from the main thread (PDEATHSIG follows
    the thread that forked)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(cmd, name, tmp):
    """Starts `cmd` in a session of its own (a terminal's Ctrl-C reaches only this script,
    which ends it), its output appended to {tmp}/{name}.log."""
    log = os.path.join(tmp, f"{name}.log")
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, preexec_fn=_die_with_parent)
    p.name, p.log = name, log
    STARTED.append(p)
    return p


def stop_all():
    end_all(STARTED, cont=True)


# === Ports ===

class Ports:
    """Free loopback ports, one per name, allocated up front: the kernel picks each (bind
    127.0.0.1:0) and each stays bound, never listening, until `take` releases it just before
    the process that listens on it starts. While held, the port cannot become the source
    port of one of this run's own outgoing connections (same ephemeral range), whose
    TIME_WAIT would make the later listen fail. `hold` does the same for a killed backend's
    port until its restart (which also rules out a health check connecting to itself)."""

    def __init__(self, names):
        self._held = {}
        self.map = {n: self._reserve() for n in names}

    def _reserve(self, port=0):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
        port = s.getsockname()[1]
        self._held[port] = s
        return port

    def take(self, name):
        port = self.map[name]
        s = self._held.pop(port, None)
        if s:
            s.close()
        return port

    def hold(self, name):
        try:
            self._reserve(self.map[name])
        except OSError:
            pass  # best effort

    def close(self):
        for s in self._held.values():
            s.close()
        self._held.clear()


# === PKI ===

def openssl(*a):
    subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)


class Pki:
    """A backend CA and certificate (SAN kubernetes), a public CA, and the terminate
    listener's certificate from it (SAN localhost, 127.0.0.1), which `rotate` replaces.
    ECDSA P-256, made with the openssl CLI."""

    EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def __init__(self, d):
        self.d = d
        self.backend_ca, self.backend_ca_key = self._ca("backend-ca", "apilb soak backend CA")
        self.backend_cert, self.backend_key = self._leaf("backend", self.backend_ca, self.backend_ca_key,
                                                         "kubernetes", "DNS:kubernetes")
        self.public_ca, self.public_ca_key = self._ca("public-ca", "apilb soak public CA")
        self.public_cert = os.path.join(d, "public.crt")
        self.public_key = os.path.join(d, "public.key")
        self.generation = 0
        self.fingerprint = self.rotate()

    def _ca(self, name, cn):
        crt, key = os.path.join(self.d, f"{name}.crt"), os.path.join(self.d, f"{name}.key")
        openssl("req", "-x509", *self.EC, "-keyout", key, "-out", crt, "-days", "365", "-subj", f"/CN={cn}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        os.chmod(key, 0o600)
        return crt, key

    def _leaf(self, name, ca, ca_key, cn, san):
        crt, key = os.path.join(self.d, f"{name}.crt"), os.path.join(self.d, f"{name}.key")
        csr, ext = crt + ".csr", crt + ".ext"
        openssl("req", *self.EC, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        with open(ext, "w") as f:
            f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", f"0x{random.getrandbits(63):x}",
                "-out", crt, "-days", "365", "-extfile", ext)
        os.chmod(key, 0o600)
        os.unlink(csr)
        os.unlink(ext)
        return crt, key

    def rotate(self):
        """A new key and certificate for the terminate listener from the same public CA,
        renamed into place (key, then certificate): returns the new certificate's sha256."""
        self.generation += 1
        crt, key = self._leaf(f"public-next{self.generation}", self.public_ca, self.public_ca_key,
                              "localhost", "DNS:localhost,IP:127.0.0.1")
        with open(crt) as f:
            fp = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()
        os.replace(key, self.public_key)
        os.replace(crt, self.public_cert)
        return fp


# === Config ===

VALID = (  # what the valid reloads change: balance, weights, slow start (never an address)
    {"balance": "least-conn", "weights": (1, 1, 1), "slow_start": "0s"},
    {"balance": "round-robin", "weights": (2, 1, 1), "slow_start": "0s"},
    {"balance": "random-two", "weights": (1, 2, 1), "slow_start": "2s"},
    {"balance": "least-conn", "weights": (1, 1, 2), "slow_start": "0s"},
)
INVALID = ("bad_duration", "unknown_key", "unknown_pool", "toml_syntax")


def config_text(ports, pki, variant, invalid=None):
    v = VALID[variant % len(VALID)]
    out = [f'# apilb soak: variant {variant}{", invalid: " + invalid if invalid else ""}\n'
           f'[admin]\nlisten = "{HOST}:{ports["admin"]}"\n']
    for pool, backends in POOLS.items():
        timeout = '"2"' if invalid == "bad_duration" and pool == "plain" else '"2s"'
        key = "conect_timeout" if invalid == "unknown_key" and pool == "tls" else "connect_timeout"
        out.append(f'\n[[pool]]\nname = "{pool}"\nbalance = "{v["balance"]}"\n{key} = {timeout}\n'
                   f'drain_timeout = "5s"\nslow_start = "{v["slow_start"]}"\n')
        for b, w in zip(backends, v["weights"]):
            out.append(f'  [[pool.backend]]\n  name = "{b}"\n  address = "{HOST}:{ports[b]}"\n  weight = {w}\n')
        check = "tcp" if pool == "plain" else "tls"
        out.append(f'  [pool.health]\n  check = "{check}"\n  interval = "500ms"\n  timeout = "400ms"\n'
                   f'  fall = 2\n  rise = 1\n')
        if pool == "tls":
            out.append(f'  [pool.tls]\n  ca = "{pki.backend_ca}"\n  server_name = "kubernetes"\n')
    out.append(f'\n[[listener]]\nname = "passthrough"\nlisten = "{HOST}:{ports["passthrough"]}"\npool = "plain"\n'
               f'first_byte_timeout = "{FIRST_BYTE_TIMEOUT:g}s"\n')
    tpool = "missing" if invalid == "unknown_pool" else "tls"
    out.append(f'\n[[listener]]\nname = "terminate"\nlisten = "{HOST}:{ports["terminate"]}"\nmode = "terminate"\n'
               f'pool = "{tpool}"\n  [listener.tls]\n  cert = "{pki.public_cert}"\n  key = "{pki.public_key}"\n'
               f'  handshake_timeout = "{HANDSHAKE_TIMEOUT:g}s"\n')
    if invalid == "toml_syntax":
        out.append('\n[[listener]\nname = "half-written\n')
    return "".join(out)


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# === The backend server (this script with --serve) ===

def serve(name, port, cert=None, key=None):
    """One backend: on accept, writes `name\\n`, then echoes every byte; SIGUSR1 resets every
    connection it holds (SO_LINGER 0, then close: an RST); SIGTERM ends it."""
    async def run():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _ctx: None)  # health probes and resets are noise
        conns = set()
        ident = f"{name}\n".encode()
        ctx = None
        if cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            ctx.set_alpn_protocols(["h2", "http/1.1"])

        async def handle(reader, writer):
            conns.add(writer)
            try:
                writer.write(ident)
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    writer.write(data)
                    await writer.drain()
            except (OSError, ssl.SSLError, EOFError):
                pass
            finally:
                conns.discard(writer)
                writer.close()

        def reset():
            n = 0
            for w in list(conns):
                try:
                    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except (OSError, AttributeError):
                    pass
                w.transport.abort()
                n += 1
            print(f"{time.strftime('%H:%M:%S')} {name}: reset {n} connections", flush=True)

        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, reset)
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        kw = {"ssl": ctx, "ssl_handshake_timeout": 15} if ctx else {}
        srv = await asyncio.start_server(handle, HOST, port, backlog=1024, **kw)
        print(f"{time.strftime('%H:%M:%S')} {name}: listening on {HOST}:{port}{' (TLS)' if ctx else ''}", flush=True)
        await done.wait()
        srv.close()

    asyncio.run(run())


# === /proc and /metrics ===

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def limit_leaving(pid, free):
    """The descriptor limit under which exactly `free` descriptor numbers are unused (new
    descriptors take the lowest free number, so that is what the process can still open)."""
    used = set(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    limit, holes = 0, 0
    while True:
        if limit not in used:
            if holes == free:
                return limit
            holes += 1
        limit += 1


def nofile_limits(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise RuntimeError(f"no 'Max open files' in /proc/{pid}/limits")


def fd_kinds(pid):
    """apilb's open descriptors by kind (socket, pipe, anon_inode:[eventpoll], file...)."""
    kinds = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds["file" if target.startswith("/") else re.sub(r"\[\d+\]$", "", target).rstrip(":")] += 1
    return dict(sorted(kinds.items()))


def have_cap(bit):
    """Whether this process has capability `bit` in its effective set (24: CAP_SYS_RESOURCE)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text -> {(name, ((label, value), ...)): float}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[(m.group(1), tuple(sorted(_LABEL.findall(m.group(2) or ""))))] = float(m.group(3))
            except ValueError:
                pass
    return out


def msum(m, name, **labels):
    return sum(v for (n, ls), v in m.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def metric_deltas(a, b, prefixes=("apilb_listener_", "apilb_tls_", "apilb_backend_connect_errors",
                                  "apilb_config_reloads", "apilb_pool_fail_open", "apilb_backend_connections")):
    """Counter deltas from scrape a to scrape b, as "name{k=v,...}": delta (non-zero only)."""
    out = {}
    for key, v in b.items():
        name, labels = key
        if not name.startswith(prefixes) or not name.endswith("_total"):
            continue
        d = v - a.get(key, 0.0)
        if d:
            out[name + ("{" + ",".join(f"{k}={x}" for k, x in labels) + "}" if labels else "")] = d
    return dict(sorted(out.items()))


# === The run ===

class Corrupt(Exception):
    """A byte that came back different: never excused."""


class WrongAlpn(Exception):
    """The terminate listener answered another ALPN than the backend's http/1.1: never excused."""


class Eof(Exception):
    pass


def describe(e):
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return f"EOF after {len(e.partial)} of {e.expected} bytes"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"


class Op:
    """One client operation: what a failure is judged by."""
    __slots__ = ("kind", "listener", "t0", "backend", "port", "phase", "wall")

    def __init__(self, kind, listener, t0):
        self.kind, self.listener, self.t0 = kind, listener, t0
        self.backend = self.port = None
        self.phase = "connect"
        self.wall = time.time()


class Soak:
    def __init__(self, args, plan, tmp, ports, pki):
        self.args, self.plan, self.tmp, self.ports, self.pki = args, plan, tmp, ports, pki
        self.port = dict(ports.map)
        self.conf = os.path.join(tmp, "apilb.toml")
        self.t_start = time.monotonic()
        self.rng = random.Random(plan["seed"])
        self.stopping = False
        self.stop_ev = None
        self.backends = {}
        self.busy = set()
        self.apilb = None
        self.phase = "setup"
        self.ops = defaultdict(Counter)         # kind -> "listener:outcome" -> n
        self.failures = []                      # client failures, judged at the end
        self.issues = []                        # probes that misbehaved (slowloris not closed...), judged too
        self.corruptions = []
        self.corrupted_bytes = 0
        self.checked = Counter()                # kind -> bytes compared equal
        self.events = []                        # faults, reloads, rotations: {kind, target, pool, start, end, ...}
        self.probes = defaultdict(Counter)      # slowloris / garbage / bogus_alpn outcomes
        self.slow_close = defaultdict(list)     # "listener:mode" -> seconds to close
        self.reloads, self.rotations, self.emfile = [], [], []
        self.variant = 0
        self.n_invalid = 0
        self.admin_errors = []
        self.lag_max = 0.0
        self.lag_over_1s = 0
        self.fatal = []                         # fails the run outright
        self.notes = []
        self.harness_errors = []
        self.samples = {}
        self.metrics = {}
        self.shutdown = None
        self.load_tasks, self.slow_tasks = [], []
        self.cctx = ssl.create_default_context(cafile=pki.public_ca)
        self.cctx.set_alpn_protocols(["http/1.1"])
        self.bogus_ctx = ssl.create_default_context(cafile=pki.public_ca)
        self.bogus_ctx.set_alpn_protocols(["bogus"])
        self.client_hello = self._client_hello()

    # --- bookkeeping ---

    def now(self):
        return time.monotonic() - self.t_start

    def count(self, kind, listener, outcome, n=1):
        self.ops[kind][f"{listener}:{outcome}"] += n

    def fail(self, op, e, t0=None):
        self.count(op.kind, op.listener, "failed")
        self.failures.append({
            "kind": op.kind, "listener": op.listener, "backend": op.backend, "phase": op.phase,
            "t0": round(op.t0 if t0 is None else t0, 3), "t1": round(self.now(), 3), "error": describe(e),
            "client_port": op.port, "wall": time.strftime("%H:%M:%S", time.localtime(op.wall)),
            "never_excused": isinstance(e, (Corrupt, WrongAlpn)), "soak_phase": self.phase,
        })

    def issue(self, kind, listener, t0, t1, what, port=None, never_excused=False):
        """A probe that misbehaved: excused only by an EMFILE episode (its accept waited)."""
        self.issues.append({"kind": kind, "listener": listener, "backend": None, "phase": "probe",
                            "t0": round(t0, 3), "t1": round(t1, 3), "error": what, "client_port": port,
                            "never_excused": never_excused, "emfile_only": True, "soak_phase": self.phase,
                            "wall": time.strftime("%H:%M:%S")})

    def begin(self, kind, target=None, **detail):
        ev = {"kind": kind, "target": target, "pool": POOL_OF.get(target), "start": round(self.now(), 3),
              "end": None, **detail}
        self.events.append(ev)
        return ev

    def end(self, ev):
        ev["end"] = round(self.now(), 3)

    def verify(self, op, expected, got, offset=0):
        """Compares `got` with `expected[offset:]`; counts the equal bytes, or records the
        corruption and raises Corrupt."""
        n = len(got)
        if got == expected[offset:offset + n]:
            self.checked[op.kind] += n
            return
        want = expected[offset:offset + n]
        bad = sum(1 for a, b in zip(got, want) if a != b) + max(0, n - len(want))
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        self.corrupted_bytes += bad
        self.checked[op.kind] += n - bad
        self.corruptions.append({"kind": op.kind, "listener": op.listener, "backend": op.backend,
                                 "offset": offset + first, "bad_bytes": bad, "t": round(self.now(), 3),
                                 "client_port": op.port})
        raise Corrupt(f"{bad} of {n} bytes differ, first at offset {offset + first}")

    def payload(self, lo, hi):
        n = self.rng.randint(lo, hi)
        return self.rng.getrandbits(8 * n).to_bytes(n, "little")

    async def pause(self, secs):
        """Sleeps `secs`, or less when the load stops: True when it stops."""
        if self.stopping:
            return True
        try:
            await asyncio.wait_for(self.stop_ev.wait(), secs)
            return True
        except asyncio.TimeoutError:
            return self.stopping

    @staticmethod
    def _client_hello():
        """The bytes of a real ClientHello, for the slowloris that dribbles them."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return out.read()

    # --- processes ---

    async def wait_listening(self, p, port, timeout=20):
        loop = asyncio.get_running_loop()
        end = time.monotonic() + timeout
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited with status {p.returncode} before listening on {HOST}:{port}; "
                                   f"its log:\n{log_tail(p.log)}")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(s, (HOST, port)), 1)
                return
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() > end:
                    raise RuntimeError(f"{p.name}: nothing listens on {HOST}:{port} after {timeout} s; "
                                       f"its log:\n{log_tail(p.log)}") from None
                await asyncio.sleep(0.05)
            finally:
                s.close()

    async def start_backend(self, name):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", name, "--port", str(self.port[name])]
        if POOL_OF[name] == "tls":
            cmd += ["--cert", self.pki.backend_cert, "--key", self.pki.backend_key]
        self.ports.take(name)
        p = spawn(cmd, f"backend-{name}", self.tmp)
        await self.wait_listening(p, self.port[name])
        return p

    async def reap(self, p, timeout=10):
        end = time.monotonic() + timeout
        while p.poll() is None and time.monotonic() < end:
            await asyncio.sleep(0.01)

    async def start_topology(self):
        for b in BACKENDS:
            self.backends[b] = await self.start_backend(b)
        write_atomic(self.conf, config_text(self.port, self.pki, 0))
        cmd = [self.args.binary, "run", "--config", self.conf, "--log-level", "info"]
        if self.args.threads:
            cmd += ["--threads", str(self.args.threads)]
        for n in ("passthrough", "terminate", "admin"):
            self.ports.take(n)
        self.apilb = spawn(cmd, "apilb", self.tmp)
        for n in ("admin", "passthrough", "terminate"):
            await self.wait_listening(self.apilb, self.port[n])
        end = time.monotonic() + 20
        while True:
            try:
                status, body = await self.http_get("/readyz")
                if status == 200:
                    break
            except (OSError, asyncio.TimeoutError, ValueError):
                body = b"(no answer)"
            if time.monotonic() > end:
                raise RuntimeError(f"apilb /readyz is not 200 after 20 s: {body[:300]!r}")
            await asyncio.sleep(0.2)

    # --- admin ---

    async def http_get(self, path, timeout=5.0):
        async def get():
            r, w = await asyncio.open_connection(HOST, self.port["admin"])
            try:
                w.write(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
                data = await r.read()
            finally:
                w.close()
            head, _, body = data.partition(b"\r\n\r\n")
            parts = head.split(b" ", 2)
            if len(parts) < 2:
                raise ValueError(f"no HTTP status line: {head[:80]!r}")
            return int(parts[1]), body
        return await asyncio.wait_for(get(), timeout)

    async def scrape(self):
        try:
            status, body = await self.http_get("/metrics")
            if status != 200:
                raise ValueError(f"/metrics answered {status}")
            return parse_metrics(body.decode(errors="replace"))
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            self.admin_errors.append({"t": round(self.now(), 3), "error": describe(e)})
            self.issue("admin", None, self.now() - 5, self.now(), f"/metrics: {describe(e)}")
            raise

    async def reload_counts(self):
        for attempt in range(3):
            try:
                m = await self.scrape()
                return (msum(m, "apilb_config_reloads_total", result="success"),
                        msum(m, "apilb_config_reloads_total", result="failure"))
            except (OSError, asyncio.TimeoutError, ValueError):
                await asyncio.sleep(0.5)
        raise RuntimeError("the admin server did not answer /metrics three times in a row")

    async def active_connections(self):
        m = await self.scrape()
        return int(msum(m, "apilb_listener_active_connections"))

    # --- client connections ---

    async def open_client(self, op, ctx=None):
        """A connection to op.listener: plain TCP for passthrough; TLS for terminate (the
        public CA, server_name localhost, ALPN http/1.1, which must come back)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            op.phase = "connect"
            await loop.sock_connect(sock, (HOST, self.port[op.listener]))
            op.port = sock.getsockname()[1]
            if op.listener == "terminate":
                op.phase = "handshake"
                r, w = await asyncio.open_connection(sock=sock, ssl=ctx or self.cctx, server_hostname="localhost",
                                                     ssl_handshake_timeout=CONNECT_TIMEOUT, limit=1 << 20)
                if ctx is None:
                    alpn = w.get_extra_info("ssl_object").selected_alpn_protocol()
                    if alpn != "http/1.1":
                        w.close()
                        raise WrongAlpn(f"ALPN {alpn!r} from the gateway; the backend chooses 'http/1.1'")
            else:
                r, w = await asyncio.open_connection(sock=sock, limit=1 << 20)
        except BaseException:
            sock.close()
            raise
        return r, w

    @staticmethod
    async def close(w):
        if w is None:
            return
        try:
            w.close()
            await asyncio.wait_for(w.wait_closed(), 2)
        except Exception:
            pass

    async def read_id(self, op, r):
        op.phase = "id"
        line = await r.readline()
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        name = line[:-1].decode("ascii", "replace")
        if name not in POOLS[LISTENERS[op.listener]]:
            self.corrupted_bytes += len(line)
            self.corruptions.append({"kind": op.kind, "listener": op.listener, "backend": None, "offset": "id line",
                                     "bad_bytes": len(line), "t": round(self.now(), 3), "client_port": op.port,
                                     "got": repr(line[:80])})
            raise Corrupt(f"ID line {line[:80]!r} names no backend of pool {LISTENERS[op.listener]}")
        op.backend = name

    async def read_echo(self, op, r, msg):
        try:
            got = await r.readexactly(len(msg))
        except asyncio.IncompleteReadError as e:
            self.verify(op, msg, e.partial)
            raise
        self.verify(op, msg, got)

    # --- loads ---

    async def watch(self, listener, idx):
        if await self.pause(idx * WATCH_EVERY / WATCHES):
            return
        while not self.stopping:
            op = Op("watch", listener, self.now())
            last_ok = op.t0
            w = None
            try:
                r, w = await asyncio.wait_for(self.open_client(op), CONNECT_TIMEOUT)
                msg = self.payload(16, 64)
                op.phase = "first message"
                w.write(msg)
                await asyncio.wait_for(self.read_id(op, r), ECHO_TIMEOUT)
                op.phase = "echo"
                await asyncio.wait_for(self.read_echo(op, r, msg), ECHO_TIMEOUT)
                self.count("watch", listener, "connected")
                last_ok = self.now()
                while not await self.pause(WATCH_EVERY):
                    msg = self.payload(16, 64)
                    w.write(msg)
                    await asyncio.wait_for(self.read_echo(op, r, msg), ECHO_TIMEOUT)
                    self.count("watch", listener, "messages")
                    last_ok = self.now()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.fail(op, e, t0=last_ok)  # the span since the last good echo
                await self.pause(1.0)
            finally:
                await self.close(w)

    async def short_body(self, op, holder):
        r, w = await self.open_client(op)
        holder.append(w)
        msg = self.payload(*SHORT_SIZE)
        op.phase = "request"
        w.write(msg)
        await self.read_id(op, r)
        op.phase = "echo"
        await self.read_echo(op, r, msg)

    async def short_one(self, listener, kind="short", record=True):
        op = Op(kind, listener, self.now())
        holder = []
        try:
            await asyncio.wait_for(self.short_body(op, holder), OP_TIMEOUT)
            if record:
                self.count(kind, listener, "ok")
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if record:
                self.fail(op, e)
            return False
        finally:
            await self.close(holder[0] if holder else None)

    async def short_load(self, listener, rate):
        inflight = set()
        period = 1.0 / rate
        nxt = time.monotonic()
        while not self.stopping:
            if len(inflight) < SHORT_INFLIGHT:
                t = asyncio.ensure_future(self.short_one(listener))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
            else:
                self.count("short", listener, "skipped")
            nxt += period
            if nxt < time.monotonic() - 1:
                nxt = time.monotonic()  # fell behind (the loop lagged): no burst to catch up
            if await self.pause(max(0.0, nxt - time.monotonic())):
                break
        if inflight:
            await asyncio.wait(list(inflight), timeout=OP_TIMEOUT + 5)

    async def bulk_one(self, listener):
        op = Op("bulk", listener, self.now())
        data = self.rng.getrandbits(8 * BULK_BYTES).to_bytes(BULK_BYTES, "little")
        digest = hashlib.sha256(data).digest()
        holder = []

        async def body():
            r, w = await self.open_client(op)
            holder.append(w)
            mv = memoryview(data)

            async def send():
                for off in range(0, len(data), 1 << 16):
                    w.write(mv[off:off + (1 << 16)])
                    await w.drain()
            op.phase = "transfer"
            sender = asyncio.ensure_future(send())
            try:
                await self.read_id(op, r)
                h, pos = hashlib.sha256(), 0
                while pos < len(data):
                    chunk = await r.read(min(1 << 18, len(data) - pos))
                    if not chunk:
                        raise Eof(f"EOF after {pos} of {len(data)} bytes")
                    self.verify(op, data, chunk, pos)
                    h.update(chunk)
                    pos += len(chunk)
                await sender
            finally:
                if not sender.done():
                    sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if h.digest() != digest:
                self.corrupted_bytes += 1
                raise Corrupt("sha256 of the echo differs")
            self.checked["bulk_sha256_compared"] += 1

        try:
            await asyncio.wait_for(body(), BULK_TIMEOUT)
            self.count("bulk", listener, "ok")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.fail(op, e)
        finally:
            await self.close(holder[0] if holder else None)

    async def bulk_loop(self, listener):
        while not self.stopping:
            await self.bulk_one(listener)
            if await self.pause(BULK_PAUSE):
                break

    async def slowloris(self, listener, idx):
        """Holds one client that sends nothing (or, on terminate, dribbles a ClientHello a
        byte every DRIBBLE_EVERY s) until the gateway closes it; again and again."""
        if await self.pause(idx * 10.0 / SLOWLORIS):
            return
        loop = asyncio.get_running_loop()
        mode = "dribble" if listener == "terminate" and idx % 2 else "silent"
        timeout = FIRST_BYTE_TIMEOUT if listener == "passthrough" else HANDSHAKE_TIMEOUT
        key = f"{listener}:{mode}"
        while not self.stopping:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            t0 = self.now()
            try:
                try:
                    await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port[listener])), CONNECT_TIMEOUT)
                except (OSError, asyncio.TimeoutError) as e:
                    self.probes["slowloris"][f"{key}:connect_failed"] += 1
                    self.issue("slowloris", listener, t0, self.now(), f"connect: {describe(e)}")
                    await self.pause(1.0)
                    continue
                port = sock.getsockname()[1]
                t_conn = self.now()
                deadline = t_conn + timeout + SLOW_GIVE_UP
                sent, nxt = 0, t_conn + DRIBBLE_EVERY
                closed = None
                while closed is None:
                    wait = deadline - self.now()
                    if mode == "dribble":
                        wait = min(wait, nxt - self.now())
                    try:
                        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), max(0.01, wait))
                        if not data:
                            closed = self.now()
                    except asyncio.TimeoutError:
                        if self.now() >= deadline:
                            break
                        if mode == "dribble" and self.now() >= nxt:
                            nxt += DRIBBLE_EVERY
                            if sent < len(self.client_hello):
                                try:
                                    await loop.sock_sendall(sock, self.client_hello[sent:sent + 1])
                                    sent += 1
                                except OSError:
                                    closed = self.now()
                    except OSError:  # a reset (or any error) is the gateway closing it
                        closed = self.now()
                if closed is None:
                    outcome = "not_closed"
                else:
                    took = closed - t_conn
                    self.slow_close[key].append(round(took, 3))
                    outcome = ("early" if took < timeout - SLOW_EARLY else
                               "in_time" if took <= timeout + SLOW_SLACK else "late")
                self.probes["slowloris"][f"{key}:{outcome}"] += 1
                if outcome != "in_time":
                    self.issue("slowloris", listener, t_conn, closed or self.now(),
                               f"{mode} client {outcome.replace('_', ' ')}"
                               f"{'' if closed is None else f' after {closed - t_conn:.1f} s'} "
                               f"(timeout {timeout:g} s)", port)
            finally:
                sock.close()
            if await self.pause(self.rng.uniform(0.2, 1.0)):
                break

    async def garbage_one(self):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        t0 = self.now()
        port = None
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port["terminate"])), CONNECT_TIMEOUT)
            port = sock.getsockname()[1]
            junk = (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" if self.rng.random() < 0.5
                    else bytes([self.rng.randrange(0x17, 0x100)]) + self.payload(31, 63))
            await loop.sock_sendall(sock, junk)
            end = time.monotonic() + PROBE_CLOSE_WITHIN
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), max(0.01, end - time.monotonic()))
                if not data:
                    break
            self.probes["garbage"]["closed"] += 1
        except (ConnectionResetError, BrokenPipeError):
            self.probes["garbage"]["closed"] += 1
        except asyncio.TimeoutError:
            self.probes["garbage"]["not_closed"] += 1
            self.issue("garbage", "terminate", t0, self.now(), f"garbage not closed within {PROBE_CLOSE_WITHIN:g} s",
                       port)
        except OSError as e:
            self.probes["garbage"]["connect_failed"] += 1
            self.issue("garbage", "terminate", t0, self.now(), f"connect: {describe(e)}", port)
        finally:
            sock.close()

    async def bogus_one(self):
        op = Op("bogus_alpn", "terminate", self.now())
        w = None
        try:
            _r, w = await asyncio.wait_for(self.open_client(op, ctx=self.bogus_ctx), PROBE_CLOSE_WITHIN)
            alpn = w.get_extra_info("ssl_object").selected_alpn_protocol()
            self.probes["bogus_alpn"]["accepted"] += 1
            self.issue("bogus_alpn", "terminate", op.t0, self.now(),
                       f"a ClientHello with only ALPN 'bogus' was accepted (ALPN {alpn!r})", op.port,
                       never_excused=True)
        except ssl.SSLError as e:
            what = e.reason or re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(e))[:80]
            self.probes["bogus_alpn"][f"refused ({what})"] += 1
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError, EOFError):
            self.probes["bogus_alpn"]["refused:closed"] += 1
        except asyncio.TimeoutError:
            self.probes["bogus_alpn"]["timeout"] += 1
            self.issue("bogus_alpn", "terminate", op.t0, self.now(),
                       f"no answer within {PROBE_CLOSE_WITHIN:g} s (phase {op.phase})", op.port)
        except OSError as e:
            self.probes["bogus_alpn"]["connect_failed"] += 1
            self.issue("bogus_alpn", "terminate", op.t0, self.now(), f"{op.phase}: {describe(e)}", op.port)
        finally:
            await self.close(w)

    async def probe_loop(self):
        tasks = set()
        while not await self.pause(PROBE_EVERY):
            for coro in (self.garbage_one(), self.bogus_one()):
                t = asyncio.ensure_future(coro)
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(list(tasks), timeout=PROBE_CLOSE_WITHIN + 5)

    def start_load(self):
        self.stopping = False
        self.stop_ev = asyncio.Event()
        rate = SHORT_RATE / len(LISTENERS)
        tasks = []
        for l in LISTENERS:
            tasks += [asyncio.ensure_future(self.watch(l, i)) for i in range(WATCHES)]
            tasks.append(asyncio.ensure_future(self.short_load(l, rate)))
            tasks.append(asyncio.ensure_future(self.bulk_loop(l)))
        tasks.append(asyncio.ensure_future(self.probe_loop()))
        self.load_tasks = tasks
        self.slow_tasks = [asyncio.ensure_future(self.slowloris(l, i)) for l in LISTENERS for i in range(SLOWLORIS)]

    async def stop_load(self):
        self.stopping = True
        self.stop_ev.set()
        for t in self.slow_tasks:
            t.cancel()
        _done, pending = await asyncio.wait(self.load_tasks, timeout=OP_TIMEOUT + 10)
        for t in pending:
            t.cancel()
        self.collect(await asyncio.gather(*self.load_tasks, *self.slow_tasks, return_exceptions=True), "load")

    def collect(self, results, what):
        """Harness bugs must not pass silently: an exception a task ended with fails the run."""
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                text = "".join(traceback.format_exception(type(r), r, r.__traceback__))
                self.harness_errors.append(f"{what}: {text[-1500:]}")
                print(f"harness error in {what}:\n{text}", file=sys.stderr)

    # --- faults ---

    async def backend_faults(self, until):
        order = ("p0", "t0", "p1", "t1", "p2", "t2")
        kinds = ("kill", "reset", "stop")
        i = 0
        running = set()
        nxt = time.monotonic() + FAULT_EVERY / 2
        while True:
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            nxt += FAULT_EVERY
            if self.now() >= until:
                break
            dead = [b for b, p in self.backends.items() if b not in self.busy and p.poll() is not None]
            if dead:
                p = self.backends[dead[0]]
                self.fatal.append(f"backend {dead[0]} exited by itself (status {p.returncode}); "
                                  f"log: {log_tail(p.log, 500)}")
                break
            for _ in range(len(order)):
                target, kind = order[i % len(order)], kinds[(i + i // len(order)) % len(kinds)]
                i += 1
                if target not in self.busy:
                    t = asyncio.ensure_future(self.backend_fault(kind, target))
                    running.add(t)
                    t.add_done_callback(running.discard)
                    break
        if running:
            self.collect(await asyncio.gather(*running, return_exceptions=True), "backend fault")

    async def backend_fault(self, kind, name):
        self.busy.add(name)
        p = self.backends[name]
        ev = self.begin(kind, name)
        try:
            if kind == "kill":
                p.kill()
                await self.reap(p)
                self.ports.hold(name)
                await asyncio.sleep(KILL_DOWN)
                self.backends[name] = await self.start_backend(name)
            elif kind == "reset":
                p.send_signal(signal.SIGUSR1)
                await asyncio.sleep(RESET_SPAN)
            else:
                p.send_signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(STOP_FOR)
                finally:
                    p.send_signal(signal.SIGCONT)
        finally:
            self.end(ev)
            self.busy.discard(name)

    def prlimit(self, pid, soft, hard):
        subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"], check=True,
                       capture_output=True, timeout=10)

    async def emfile_episode(self):
        pid = self.apilb.pid
        soft, hard = nofile_limits(pid)
        in_use = fd_count(pid)
        limit = limit_leaving(pid, EMFILE_HEADROOM)
        # Raising a hard limit again needs CAP_SYS_RESOURCE (which a container's root may lack):
        # without it only the soft limit is lowered, which is what EMFILE is decided by anyway.
        low_hard = str(limit) if have_cap(24) else hard
        m0 = await self.scrape()
        cpu0 = cpu_seconds(pid)
        ev = self.begin("emfile", None, limit=limit, in_use=in_use, lowered=f"{limit}:{low_hard}")
        try:
            self.prlimit(pid, limit, low_hard)
            await asyncio.sleep(EMFILE_FOR)
        finally:
            try:
                self.prlimit(pid, soft, hard)  # synchronous: also when cancelled
            except (OSError, subprocess.SubprocessError) as e:
                self.fatal.append(f"could not restore apilb's descriptor limit to {soft}:{hard}: {e}; "
                                  f"the rest of the run is not meaningful")
                raise
            finally:
                self.end(ev)
        cpu = (cpu_seconds(pid) - cpu0) / max(0.1, ev["end"] - ev["start"])
        # How soon does it serve again? A passthrough and a terminate request, until both pass.
        t_restored = self.now()
        rec = {}
        for l in LISTENERS:
            rec[l] = None
            while self.now() - t_restored < 10:
                if await self.short_one(l, kind="recovery_probe", record=False):
                    rec[l] = round(self.now() - t_restored, 3)
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(max(0.0, t_restored + 1.5 - self.now()))
        m1 = await self.scrape()
        ep = {"start": ev["start"], "end": ev["end"], "limit": limit, "fds_in_use": in_use,
              "restored": f"{soft}:{hard}", "gateway_cpu_cores": round(cpu, 3),
              "accept_errors": msum(m1, "apilb_listener_accept_errors_total")
              - msum(m0, "apilb_listener_accept_errors_total"),
              "connect_errors_local": msum(m1, "apilb_listener_connect_errors_total", cause="local")
              - msum(m0, "apilb_listener_connect_errors_total", cause="local"),
              "recovered_s": rec}
        self.emfile.append(ep)
        if any(v is None for v in rec.values()):
            self.fatal.append(f"EMFILE episode at {ev['start']:.1f} s: no request passed within 10 s of the "
                              f"restore ({rec})")

    async def do_reload(self, valid):
        before = await self.reload_counts()
        if valid:
            self.variant += 1
            invalid = None
        else:
            invalid = INVALID[self.n_invalid % len(INVALID)]
            self.n_invalid += 1
        write_atomic(self.conf, config_text(self.port, self.pki, self.variant, invalid))
        ev = self.begin("reload_valid" if valid else "reload_invalid", None, invalid=invalid)
        self.apilb.send_signal(signal.SIGHUP)
        # Two reloads are counted: the SIGHUP's, and the file watcher's about a second later.
        want = (before[0] + 2, before[1]) if valid else (before[0], before[1] + 2)
        got = before
        while self.now() - ev["start"] < 5:
            await asyncio.sleep(0.4)
            got = await self.reload_counts()
            if got[0] >= want[0] and got[1] >= want[1]:
                break
        self.end(ev)
        s, f = got[0] - before[0], got[1] - before[1]
        ok = (s >= 1 and f == 0) if valid else (f >= 1 and s == 0)
        self.reloads.append({"t": ev["start"], "valid": valid, "invalid": invalid, "variant": self.variant,
                             "success": s, "failure": f, "ok": ok, "seconds": round(ev["end"] - ev["start"], 2)})

    async def probe_cert(self):
        op = Op("rotation_probe", "terminate", self.now())
        w = None
        try:
            _r, w = await asyncio.wait_for(self.open_client(op), CONNECT_TIMEOUT)
            der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
            self.count("rotation_probe", "terminate", "ok")
            return hashlib.sha256(der).hexdigest()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.fail(op, e)
            return None
        finally:
            await self.close(w)

    async def rotate(self):
        before = await self.reload_counts()
        ev = self.begin("rotation", None)
        fp = await asyncio.get_running_loop().run_in_executor(None, self.pki.rotate)
        seen = None
        while self.now() - ev["start"] < 8:
            await asyncio.sleep(0.3)
            if await self.probe_cert() == fp:
                seen = round(self.now() - ev["start"], 2)
                break
        got = await self.reload_counts()
        self.end(ev)
        rec = {"t": ev["start"], "generation": self.pki.generation, "new_cert_seen_after_s": seen,
               "reload_success": got[0] - before[0], "reload_failure": got[1] - before[1]}
        rec["ok"] = seen is not None and rec["reload_failure"] == 0
        self.rotations.append(rec)

    async def controller(self, until):
        """Reloads every RELOAD_EVERY s in a cycle of six: valid, valid + a certificate
        rotation, invalid, valid + an EMFILE episode, valid, invalid. Sequential, so no
        reload reads files during an EMFILE episode."""
        slot = 0
        nxt = time.monotonic() + 1.0
        while True:
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            if self.now() >= until:
                break
            start = time.monotonic()
            k = slot % 6
            await self.do_reload(valid=k not in (2, 5))
            if k == 1:
                await asyncio.sleep(max(0.0, start + 2.0 - time.monotonic()))
                await self.rotate()
            elif k == 3 and self.now() + EMFILE_FOR + 3 < until:
                await self.emfile_episode()
            slot += 1
            nxt = max(start + RELOAD_EVERY, time.monotonic() + 0.5)

    async def lag_monitor(self):
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.1)
            lag = time.monotonic() - t - 0.1
            self.lag_max = max(self.lag_max, lag)
            if lag > 1.0:
                self.lag_over_1s += 1

    # --- measurements ---

    async def wait_idle(self, at_least, at_most):
        """Waits `at_least` s, then until apilb holds no client connection (at most `at_most` s in all)."""
        t0 = self.now()
        await asyncio.sleep(at_least)
        active = None
        while True:
            try:
                active = await self.active_connections()
            except (OSError, asyncio.TimeoutError, ValueError):
                active = None
            if active == 0 or self.now() - t0 >= at_most:
                return active
            await asyncio.sleep(0.5)

    async def sample(self):
        """apilb's open descriptors (the least of 5 readings 0.3 s apart: health checks come and
        go) and RSS (their median)."""
        pid = self.apilb.pid
        fds, rss = [], []
        for _ in range(5):
            fds.append(fd_count(pid))
            rss.append(rss_kib(pid))
            await asyncio.sleep(0.3)
        return {"fds": min(fds), "rss_kib": sorted(rss)[2], "t": round(self.now(), 3), "fd_kinds": fd_kinds(pid),
                "threads": len(os.listdir(f"/proc/{pid}/task"))}

    # --- the whole run ---

    async def run(self):
        p = self.plan
        lag = asyncio.ensure_future(self.lag_monitor())
        try:
            await self.start_topology()
            self.metrics["start"] = await self.scrape()
            print(f"  topology up: backends {', '.join(f'{b}:{self.port[b]}' for b in BACKENDS)}; apilb pid "
                  f"{self.apilb.pid}, passthrough :{self.port['passthrough']}, terminate :{self.port['terminate']}, "
                  f"admin :{self.port['admin']}", file=sys.stderr, flush=True)

            self.phase = "warmup"
            print(f"  warm-up: {p['warmup']:g} s of load, no faults", file=sys.stderr, flush=True)
            self.start_load()
            await asyncio.sleep(p["warmup"])
            await self.stop_load()
            active = await self.wait_idle(2.0, 15.0)
            self.samples["baseline"] = await self.sample()
            self.samples["baseline"]["active_connections"] = active
            self.metrics["baseline"] = await self.scrape()

            self.phase = "main"
            main_start = self.now()
            until = main_start + p["main"] - p["tail"]
            print(f"  main: {p['main']:g} s of load, faults for the first {p['main'] - p['tail']:g} s "
                  f"(baseline fds {self.samples['baseline']['fds']}, RSS "
                  f"{self.samples['baseline']['rss_kib'] / 1024:.1f} MiB)", file=sys.stderr, flush=True)
            self.start_load()
            chaos = [asyncio.ensure_future(self.backend_faults(until)), asyncio.ensure_future(self.controller(until))]
            last = self.now()
            while self.now() < main_start + p["main"]:
                await asyncio.sleep(min(10.0, main_start + p["main"] - self.now()))
                if self.apilb.poll() is not None:
                    self.fatal.append(f"apilb exited during the run (status {self.apilb.returncode}): "
                                      f"{log_tail(self.apilb.log, 800)}")
                    for t in chaos:
                        t.cancel()
                    break
                if self.now() - last >= 30 or self.now() >= main_start + p["main"]:
                    last = self.now()
                    print(f"  {self.now() - main_start:5.0f} s: {self.progress()}", file=sys.stderr, flush=True)
            self.collect(await asyncio.gather(*chaos, return_exceptions=True), "faults")
            self.phase = "cooldown"
            await self.stop_load()
            if self.apilb.poll() is None:
                active = await self.wait_idle(5.0, 10.0)
                self.samples["after"] = await self.sample()
                self.samples["after"]["active_connections"] = active
                self.metrics["end"] = await self.scrape()
                t = time.monotonic()
                self.apilb.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self.apilb.wait),
                                                  20)
                except asyncio.TimeoutError:
                    code = None
                self.shutdown = {"exit_code": code, "seconds": round(time.monotonic() - t, 2)}
        finally:
            lag.cancel()

    def progress(self):
        ok = sum(v for k, c in self.ops.items() for o, v in c.items() if not o.endswith((":failed", ":skipped")))
        return (f"{ok:,} operations ok, {len(self.failures)} client failures, "
                f"{len([e for e in self.events if e['kind'] in ('kill', 'reset', 'stop', 'emfile')])} faults, "
                f"{len(self.reloads)} reloads, {self.corrupted_bytes} corrupted bytes")


# === Judging and the report ===

def overlaps(ev, t0, t1, grace):
    end = ev["end"] if ev["end"] is not None else float("inf")
    return ev["start"] <= t1 and t0 <= end + grace


def classify(s, rec):
    """The reason a failure is expected, or None. In order: a fault of its own backend, an
    EMFILE episode, and (when no backend name was read) a fault of any backend of its pool."""
    if rec["never_excused"]:
        return None
    t0, t1 = rec["t0"], rec["t1"]
    faults = [ev for ev in s.events if ev["kind"] in ("kill", "reset", "stop") and overlaps(ev, t0, t1, FAULT_GRACE)]
    if rec["backend"] and not rec.get("emfile_only"):
        for ev in faults:
            if ev["target"] == rec["backend"]:
                return ev["kind"]
    for ev in s.events:
        if ev["kind"] == "emfile" and overlaps(ev, t0, t1, EMFILE_GRACE):
            return "emfile"
    if not rec["backend"] and not rec.get("emfile_only"):
        for ev in faults:
            if ev["pool"] == LISTENERS.get(rec["listener"]):
                return f"{ev['kind']} (pool)"
    return None


def gateway_lines(log, ports, per_port=4):
    """The gateway's access-log lines for these client ports (evidence for a failure)."""
    want = {str(p) for p in ports if p}
    out = defaultdict(list)
    if not want:
        return out
    pat = re.compile(r"client=127\.0\.0\.1:(\d+)")
    try:
        with open(log, errors="replace") as f:
            for line in f:
                m = pat.search(line)
                if m and m.group(1) in want and len(out[m.group(1)]) < per_port:
                    out[m.group(1)].append(line.strip()[:400])
    except OSError:
        pass
    return out


def emfile_health(log):
    """Health-check failures the gateway charged to backends for its own EMFILE."""
    n, backends = 0, Counter()
    try:
        with open(log, errors="replace") as f:
            for line in f:
                if "backend is unhealthy" in line and "Too many open files" in line:
                    n += 1
                    m = re.search(r"backend=(\S+)", line)
                    backends[m.group(1) if m else "?"] += 1
    except OSError:
        pass
    return n, dict(sorted(backends.items()))


def log_levels(log):
    levels, errors = Counter(), []
    pat = re.compile(r"\s(TRACE|DEBUG|INFO|WARN|ERROR)\s")
    try:
        with open(log, errors="replace") as f:
            for line in f:
                m = pat.search(line[:60])
                if m:
                    levels[m.group(1)] += 1
                    if m.group(1) in ("WARN", "ERROR") and len(errors) < 8 and "reload failed" not in line:
                        errors.append(line.strip()[:300])
    except OSError:
        pass
    return dict(levels), errors


COMPACT = ("kind", "listener", "backend", "phase", "t0", "t1", "error", "reason", "client_port")


def judge(s):
    p = s.plan
    for ev in s.events:
        if ev["end"] is None:  # the run was cut short while it ran
            ev["end"] = round(s.now(), 3)
            s.notes.append(f"{ev['kind']} at {ev['start']} s had not ended when the run stopped")
    expected, unexpected = [], []
    for rec in s.failures + s.issues:
        why = classify(s, rec)
        rec["class"] = "expected" if why else "unexpected"
        rec["reason"] = why
        (expected if why else unexpected).append(rec)
    unexpected.sort(key=lambda r: r["t0"])
    examples = [dict(r) for r in unexpected[:EXAMPLES]]
    lines = gateway_lines(os.path.join(s.tmp, "apilb.log"), [r["client_port"] for r in examples])
    for r in examples:
        r["nearby_events"] = [{k: e[k] for k in ("kind", "target", "start", "end")} for e in s.events
                              if e["start"] <= r["t1"] + 5 and (e["end"] or e["start"]) >= r["t0"] - 10]
        r["gateway_log"] = lines.get(str(r["client_port"]), [])

    m_start, m_end = s.metrics.get("start", {}), s.metrics.get("end", {})
    reload_metrics = None
    if m_end:
        reload_metrics = {
            "success": msum(m_end, "apilb_config_reloads_total", result="success")
            - msum(m_start, "apilb_config_reloads_total", result="success"),
            "failure": msum(m_end, "apilb_config_reloads_total", result="failure")
            - msum(m_start, "apilb_config_reloads_total", result="failure"),
        }
    valid = sum(1 for r in s.reloads if r["valid"])
    invalid = len(s.reloads) - valid
    rot = len(s.rotations)
    reload_expect = {"success_min": valid + rot, "success_max": 2 * valid + rot,
                     "failure_min": invalid, "failure_max": 2 * invalid,
                     "why": "each rewrite + SIGHUP reloads twice (the signal, then the file watcher), "
                            "each rotation once (the file watcher)"}

    b, a = s.samples.get("baseline"), s.samples.get("after")
    leak = None
    if b and a:
        rss_limit = max(RSS_FACTOR * b["rss_kib"], b["rss_kib"] + RSS_EXTRA_KIB)
        # Splice pipes are a bounded per-worker pool, judged against its bound; every other
        # descriptor against the baseline plus FD_MARGIN.
        pipes_b, pipes_a = b["fd_kinds"].get("pipe", 0), a["fd_kinds"].get("pipe", 0)
        workers = s.args.threads or os.cpu_count() or 1
        pipe_limit = max(pipes_b, 2 * PIPES_PER_WORKER * workers)
        other_limit = b["fds"] - pipes_b + FD_MARGIN
        leak = {"baseline": b, "after": a, "fd_limit": other_limit + pipe_limit,
                "other_fds": {"baseline": b["fds"] - pipes_b, "after": a["fds"] - pipes_a, "limit": other_limit},
                "pipe_fds": {"baseline": pipes_b, "after": pipes_a, "limit": pipe_limit,
                             "why": f"{PIPES_PER_WORKER} pooled pipes per worker x {workers} workers"},
                "rss_limit_kib": int(rss_limit),
                "fds_ok": a["fds"] - pipes_a <= other_limit and pipes_a <= pipe_limit,
                "rss_ok": a["rss_kib"] <= rss_limit}

    reasons = list(s.fatal) + [f"harness error: {e.splitlines()[-1]}" for e in s.harness_errors]
    if unexpected:
        reasons.append(f"{len(unexpected)} unexpected failure(s)")
    if s.corrupted_bytes:
        reasons.append(f"{s.corrupted_bytes} corrupted byte(s)")
    if leak is None:
        reasons.append("no leak measurement (the run did not reach its end)")
    else:
        if not leak["fds_ok"]:
            reasons.append(f"descriptor leak: {b['fds']} -> {a['fds']} (not pipes: {leak['other_fds']}, "
                           f"pipes: {leak['pipe_fds']})")
        if not leak["rss_ok"]:
            reasons.append(f"memory growth: RSS {b['rss_kib']} -> {a['rss_kib']} KiB (limit {leak['rss_limit_kib']})")
        if a.get("active_connections"):
            reasons.append(f"{a['active_connections']} client connection(s) still open in apilb 10 s after the load")
    bad_reloads = [r for r in s.reloads if not r["ok"]]
    if bad_reloads:
        reasons.append(f"{len(bad_reloads)} reload(s) not counted as expected in apilb_config_reloads_total")
    if reload_metrics and not (reload_expect["success_min"] <= reload_metrics["success"] <= reload_expect["success_max"]
                               and reload_expect["failure_min"] <= reload_metrics["failure"]
                               <= reload_expect["failure_max"]):
        reasons.append(f"apilb_config_reloads_total moved by {reload_metrics}, expected {reload_expect}")
    if s.emfile and not any(e["accept_errors"] + e["connect_errors_local"] for e in s.emfile):
        reasons.append(f"none of the {len(s.emfile)} EMFILE episode(s) made apilb meet EMFILE: they proved nothing")
    bad_rot = [r for r in s.rotations if not r["ok"]]
    if bad_rot:
        reasons.append(f"{len(bad_rot)} certificate rotation(s) not seen by clients, or failed")
    if s.shutdown and s.shutdown["exit_code"] != 0:
        reasons.append(f"apilb exited with {s.shutdown['exit_code']} on SIGTERM")
    for l in LISTENERS:
        for kind in ("short", "bulk", "watch"):
            okk = "connected" if kind == "watch" else "ok"
            if s.phase in ("cooldown",) and not s.ops[kind][f"{l}:{okk}"]:
                reasons.append(f"no successful {kind} operation through {l}: the run proves nothing")

    n_emfile_health, by_backend = emfile_health(os.path.join(s.tmp, "apilb.log"))
    if n_emfile_health:
        fo = {k: v for k, v in (metric_deltas(m_start, m_end) if m_end else {}).items() if "fail_open" in k}
        s.notes.append(f"{n_emfile_health} health-check failure(s) marked backends unhealthy with the gateway's own "
                       f"'Too many open files' during EMFILE episodes ({by_backend}); fail-open routing: {fo or 'none'}")
    faults = Counter(e["kind"] for e in s.events)
    levels, warn_lines = log_levels(os.path.join(s.tmp, "apilb.log"))
    data = {
        "settings": {**p, "binary": os.path.abspath(s.args.binary), "binary_sha256": s.args.binary_sha256,
                     "ports": s.port, "python": sys.version.split()[0],
                     "constants": {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float))
                                   and not isinstance(v, bool)}},
        "verdict": {"pass": not reasons, "reasons": reasons},
        "operations": {k: dict(sorted(c.items())) for k, c in sorted(s.ops.items())},
        "failures": {
            "expected": {"total": len(expected), "by_reason": dict(Counter(r["reason"] for r in expected)),
                         "by_kind": dict(Counter(f"{r['kind']}:{r['listener']}" for r in expected)),
                         "by_error": dict(Counter(r["error"] for r in expected).most_common(15)),
                         "samples": [r for reason in sorted({r["reason"] for r in expected})
                                     for r in [x for x in expected if x["reason"] == reason][:3]],
                         "all": [[r[k] for k in COMPACT] for r in expected], "all_fields": COMPACT},
            "unexpected": {"total": len(unexpected), "by_kind": dict(Counter(f"{r['kind']}:{r['listener']}"
                                                                             for r in unexpected)),
                           "by_error": dict(Counter(r["error"] for r in unexpected).most_common(15)),
                           "examples": examples},
        },
        "probes": {k: dict(sorted(c.items())) for k, c in sorted(s.probes.items())},
        "slowloris_close_seconds": {k: {"n": len(v), "min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v)}
                                    for k, v in sorted(s.slow_close.items()) if v},
        "bytes_checked": {"total": sum(v for k, v in s.checked.items() if k != "bulk_sha256_compared"),
                          "by_kind": dict(s.checked)},
        "corrupted_bytes": s.corrupted_bytes,
        "corruptions": s.corruptions[:EXAMPLES],
        "faults": {"by_kind": dict(faults), "events": s.events},
        "reloads": {"sent_valid": valid, "sent_invalid": invalid, "rotations": rot, "metrics_delta": reload_metrics,
                    "expected": reload_expect, "each": s.reloads},
        "rotations": s.rotations,
        "emfile_episodes": s.emfile,
        "leak": leak,
        "shutdown": s.shutdown,
        "gateway_metrics_delta": metric_deltas(m_start, m_end) if m_end else None,
        "gateway_log": {"levels": levels, "warn_error_samples": warn_lines},
        "admin_errors": s.admin_errors,
        "event_loop": {"max_lag_s": round(s.lag_max, 3), "lags_over_1s": s.lag_over_1s},
        "harness_errors": s.harness_errors,
        "notes": s.notes,
    }
    return data


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def render(d):
    st, ops = d["settings"], d["operations"]
    out = [f"\napilb soak: {st['total']:g} s of load ({'smoke' if st['smoke'] else 'full'}), warm-up "
           f"{st['warmup']:g} s, faults until {st['main'] - st['tail']:g} s into the main {st['main']:g} s; "
           f"seed {st['seed']}; {st['binary']} (sha256 {st['binary_sha256'][:12]})"]

    def opline(kind, okk="ok"):
        c = ops.get(kind, {})
        return ", ".join(f"{l} {c.get(f'{l}:{okk}', 0):,} ok / {c.get(f'{l}:failed', 0):,} failed"
                         + (f" / {c[f'{l}:skipped']:,} skipped" if c.get(f"{l}:skipped") else "")
                         for l in LISTENERS if any(k.startswith(f"{l}:") for k in c))
    w = ops.get("watch", {})
    out.append("operations:")
    out.append(f"  watches: " + ", ".join(f"{l} {w.get(f'{l}:connected', 0):,} connections, "
                                          f"{w.get(f'{l}:messages', 0):,} messages, {w.get(f'{l}:failed', 0):,} broken"
                                          for l in LISTENERS))
    out.append(f"  short requests: {opline('short')}")
    out.append(f"  bulk 4 MiB echoes: {opline('bulk')}")
    if "rotation_probe" in ops:
        out.append(f"  rotation probes: {opline('rotation_probe')}")
    pr = d["probes"]
    sl = pr.get("slowloris", {})
    out.append("  slowloris: " + ", ".join(f"{k} {v:,}" for k, v in sl.items()))
    for k, v in d["slowloris_close_seconds"].items():
        out.append(f"    {k} closed after {v['min']:.1f}-{v['max']:.1f} s (median {v['median']:.1f})")
    out.append("  garbage: " + ", ".join(f"{k} {v:,}" for k, v in pr.get("garbage", {}).items())
               + "; bogus ALPN: " + ", ".join(f"{k} {v:,}" for k, v in pr.get("bogus_alpn", {}).items()))
    bc = d["bytes_checked"]
    out.append(f"bytes compared: {bc['total'] / (1 << 20):,.1f} MiB "
               f"({', '.join(f'{k} {v / (1 << 20):,.1f} MiB' for k, v in bc['by_kind'].items() if k != 'bulk_sha256_compared')}); "
               f"bulk sha256 compared: {bc['by_kind'].get('bulk_sha256_compared', 0):,}; "
               f"corrupted bytes: {d['corrupted_bytes']}")
    f = d["faults"]["by_kind"]
    out.append(f"faults: kill {f.get('kill', 0)}, reset {f.get('reset', 0)}, stop {f.get('stop', 0)}, "
               f"EMFILE {f.get('emfile', 0)}, reloads {f.get('reload_valid', 0)} valid + {f.get('reload_invalid', 0)} "
               f"invalid, certificate rotations {f.get('rotation', 0)}")
    fe, fu = d["failures"]["expected"], d["failures"]["unexpected"]
    out.append(f"client failures: expected {fe['total']} "
               f"({', '.join(f'{k} {v}' for k, v in sorted(fe['by_reason'].items())) or 'none'}); "
               f"unexpected {fu['total']}")
    for r in fu["examples"][:10]:
        out.append(f"  UNEXPECTED {r['kind']} via {r['listener']} backend {r['backend'] or '-'} at "
                   f"{r['t0']:.1f}-{r['t1']:.1f} s ({r['wall']}) in {r['phase']}: {r['error']}"
                   + (f" [client port {r['client_port']}]" if r["client_port"] else ""))
        for line in r["gateway_log"][:2]:
            out.append(f"      gateway: {line[:200]}")
    rl = d["reloads"]
    if rl["metrics_delta"]:
        ex = rl["expected"]
        out.append(f"reloads: sent {rl['sent_valid']} valid + {rl['sent_invalid']} invalid, {rl['rotations']} rotations; "
                   f"apilb_config_reloads_total success +{rl['metrics_delta']['success']:g} (expected "
                   f"{ex['success_min']}-{ex['success_max']}), failure +{rl['metrics_delta']['failure']:g} (expected "
                   f"{ex['failure_min']}-{ex['failure_max']}); each checked: "
                   f"{sum(1 for r in rl['each'] if r['ok'])}/{len(rl['each'])} ok")
    if d["rotations"]:
        seen = [r["new_cert_seen_after_s"] for r in d["rotations"] if r["new_cert_seen_after_s"] is not None]
        out.append(f"rotations: {len(seen)}/{len(d['rotations'])} new certificates seen by clients"
                   + (f", after {min(seen):.1f}-{max(seen):.1f} s" if seen else ""))
    for e in d["emfile_episodes"]:
        out.append(f"EMFILE at {e['start']:.1f} s: limit {e['limit']} ({e['fds_in_use']} in use), accept errors "
                   f"+{e['accept_errors']:g}, local connect errors +{e['connect_errors_local']:g}, gateway CPU "
                   f"{e['gateway_cpu_cores']:.2f} cores, serving again after "
                   + ", ".join(f"{l} {v if v is None else f'{v:.2f} s'}" for l, v in e["recovered_s"].items()))
    lk = d["leak"]
    if lk:
        o, pp = lk["other_fds"], lk["pipe_fds"]
        out.append(f"leaks: fds {lk['baseline']['fds']} -> {lk['after']['fds']}: not pipes {o['baseline']} -> "
                   f"{o['after']} (limit {o['limit']}), splice pipes {pp['baseline']} -> {pp['after']} (pool bound "
                   f"{pp['limit']}); RSS {mib(lk['baseline']['rss_kib'])} -> {mib(lk['after']['rss_kib'])} "
                   f"(limit {mib(lk['rss_limit_kib'])})")
        out.append(f"  fds by kind {lk['baseline']['fd_kinds']} -> {lk['after']['fd_kinds']}")
    if d["shutdown"]:
        out.append(f"apilb SIGTERM: exit {d['shutdown']['exit_code']} after {d['shutdown']['seconds']} s")
    out.append(f"event loop: max lag {d['event_loop']['max_lag_s']:.2f} s; gateway log levels: "
               f"{d['gateway_log']['levels']}")
    for n in d["notes"]:
        out.append(f"note: {n}")
    v = d["verdict"]
    out.append(f"verdict: {'PASS' if v['pass'] else 'FAIL'}" + ("" if v["pass"] else ": " + "; ".join(v["reasons"])))
    return "\n".join(out)


# === Main ===

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    ap.add_argument("--smoke", action="store_true", help="60 s of load (what CI runs)")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/apilb"))
    ap.add_argument("--json", metavar="FILE", help="also write every figure, failure and fault to FILE")
    ap.add_argument("--seed", type=int, help="seeds the payloads and probes (default: from the clock)")
    ap.add_argument("--threads", type=int, help="apilb --threads (default: apilb's, the number of cores)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (PKI, configs, logs) after a pass too")
    ap.add_argument("--serve", metavar="NAME", help=argparse.SUPPRESS)  # internal: run one backend
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cert", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.serve:
        total = 60.0 if args.smoke else args.minutes * 60
        if total < 40:
            ap.error("at least 40 s of load (--minutes 0.67)")
        warmup = 8.0 if total <= 120 else 30.0
        tail = 10.0 if total <= 120 else 20.0
        args.plan = {"smoke": args.smoke, "total": total, "warmup": warmup, "main": total - warmup, "tail": tail,
                     "seed": args.seed if args.seed is not None else int(time.time())}
    return args


def check_configs(args, ports, pki, tmp):
    """`apilb check` on every config the run writes: the valid ones pass, the invalid ones fail."""
    path = os.path.join(tmp, "check.toml")
    problems = []
    for variant in range(len(VALID)):
        for invalid in (None,) + (INVALID if variant == 0 else ()):
            with open(path, "w") as f:
                f.write(config_text(ports.map, pki, variant, invalid))
            r = subprocess.run([args.binary, "check", "--config", path], capture_output=True, text=True, timeout=60)
            if (r.returncode == 0) != (invalid is None):
                problems.append(f"variant {variant} invalid={invalid}: `apilb check` exited {r.returncode}: "
                                f"{(r.stdout + r.stderr).strip()[-600:]}")
    os.unlink(path)
    return problems


def main():
    args = parse_args()
    if args.serve:
        serve(args.serve, args.port, args.cert, args.key)
        return 0
    for tool in ("openssl", "prlimit"):
        if not shutil.which(tool):
            print(f"{tool} is missing: run benches/soak.sh, which installs it", file=sys.stderr)
            return 2
    if not os.access(args.binary, os.X_OK):
        print(f"{args.binary} is not an executable: build it (cargo build --release) or pass --binary",
              file=sys.stderr)
        return 2
    with open(args.binary, "rb") as f:
        args.binary_sha256 = hashlib.sha256(f.read()).hexdigest()
    random.seed(args.plan["seed"])

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # Ctrl-C as KeyboardInterrupt, even when started with SIGINT ignored (a shell's background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(stop_all)
    tmp = tempfile.mkdtemp(prefix="apilb-soak-")
    ports = Ports(list(BACKENDS) + ["passthrough", "terminate", "admin"])
    data, keep = None, True
    try:
        pki = Pki(tmp)
        problems = check_configs(args, ports, pki, tmp)
        if problems:
            print("the configs this run writes are not judged as expected by `apilb check`:\n  "
                  + "\n  ".join(problems), file=sys.stderr)
            return 2
        s = Soak(args, args.plan, tmp, ports, pki)
        print(f"apilb soak: {args.plan['total']:g} s of load, seed {args.plan['seed']}, files in {tmp}",
              file=sys.stderr, flush=True)
        budget = args.plan["total"] + 240
        try:
            asyncio.run(asyncio.wait_for(s.run(), budget))
        except asyncio.TimeoutError:
            s.fatal.append(f"the run did not end within its {budget:g} s budget")
        except Exception as e:  # the topology did not come up, the admin server stopped answering...
            traceback.print_exc()
            s.fatal.append(f"the run stopped: {type(e).__name__}: {e}"[:2000])
        stop_all()
        data = judge(s)
        data["settings"]["files"] = tmp
        keep = args.keep or not data["verdict"]["pass"]
        print(render(data))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            print(f"wrote {args.json}", file=sys.stderr)
        return 0 if data["verdict"]["pass"] else 1
    finally:
        stop_all()
        ports.close()
        if keep:
            print(f"files kept in {tmp} (apilb.log, backend-*.log, apilb.toml, the PKI)", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process this run started has been ended", file=sys.stderr)
        sys.exit(130)
    finally:
        stop_all()
