#!/usr/bin/env python3
"""Two apilb gateways, one address, tested for real (issue 21): keepalived (VRRP) failover and
BGP active-active (ExaBGP on the gateways, BIRD with ECMP on a router), in network namespaces
this script creates and removes. Run as root:

    python3 tests/ha/ha.py --short            # what CI runs: VRRP scenarios 1, 4, 2, 4 and the
                                              # BGP planned stop, with assertions (< 3 min)
    python3 tests/ha/ha.py                    # every scenario, both modes
    python3 tests/ha/ha.py --mode bgp --json target/ha.json --keep

Exit 0 when every assertion held, 1 when one failed, 2 on a harness error (a tool missing, a
topology that would not come up). The figures go to stdout (and to --json).

Topology. Namespaces named apilbha-<pid>-<role> (the pid of this script: a run that finds
namespaces of a dead run's pid removes them, with any process still in them, before it starts;
those of a live run are left alone). `sw` holds a bridge, `br0`; every other namespace has one
veth, `eth0`, whose peer is a port of that bridge: no interface of the test is in the host's
namespace and no route leads out of 198.18.0.0/15 (RFC 2544's benchmarking range), which the
run checks at the end, with an nftables rule in every namespace that counts and drops any packet
for an address outside the range (the count must be 0). `api` holds three simulated apiservers (`apilb demo-apiserver`) on
198.18.3.21-23:6443; the gateways `gw1` (198.18.0.11) and `gw2` (.12) reach them through an
on-link route, the one scenario 3 removes in gw1. Each gateway runs target/release/apilb with
the same config (https checks of /readyz, shutdown_grace 6s, drain_timeout 5s).

VRRP mode: `client` (198.18.0.10) sits on the bridge too; each gateway runs keepalived with the
shipped config/keepalived.conf, only the virtual IP (198.18.0.100/24) filled in (the interface is
eth0 as shipped) and, on gw2, the `state BACKUP` and the lower priority its comments ask for.
BGP mode: `router` (198.18.0.1 on the bridge, 198.18.1.1 towards `client` at 198.18.1.10 on a
veth of their own) runs BIRD 2 with `merge paths` (ECMP, L4 hash); each gateway carries the
virtual IP 198.18.2.10/32 on lo and runs ExaBGP with the shipped config/exabgp/exabgp.conf (its
healthcheck of /readyz), only addresses filled in.

Client (tests/ha/client.py, in `client`): short requests every 50 ms and WATCHES held watches,
all through the virtual IP. Scenarios, each timed from its action until the address has moved,
every watch is up again and requests have succeeded for 2 s:
  1 planned stop: SIGTERM to gw1's apilb (the grace fails /readyz first);
  2 SIGKILL to gw1's apilb;
  3 gw1's route to the apiservers removed (its health checks fail, /readyz fails);
  4 gw1 comes back (apilb restarted, or the route restored) and, with the shipped `preempt`
    (keepalived) or by announcing again (BGP), takes its share back.
Measured: seconds until the address moved (VRRP: the VIP seen on the other gateway; BGP: the
router's route to the VIP changed its next hops), short requests failed (by kind), the time
until requests succeeded again, watches ended (by how) and re-established.

Everything started here is ended by PID (SIGTERM, then SIGKILL), and dies with this script
(PR_SET_PDEATHSIG); the namespaces go on every exit path (try/finally, SIGINT/SIGTERM/SIGHUP
unwind). The temp folder (PKI, configs, logs) is removed after a passing run, kept after a
failing one or with --keep.
"""

import argparse
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "benches"))
from harness import end_all, log_tail, on_signal  # noqa: E402

PREFIX = "apilbha-"
TEST_NET = ipaddress.ip_network("198.18.0.0/15")
LAN = "198.18.0.0/24"
API_NET = "198.18.3.0/24"
API_ADDRS = ["198.18.3.21", "198.18.3.22", "198.18.3.23"]
GW_ADDR = {"gw1": "198.18.0.11", "gw2": "198.18.0.12"}
VRRP_CLIENT = "198.18.0.10"
VRRP_VIP = "198.18.0.100"
ROUTER_LAN = "198.18.0.1"
ROUTER_CLIENT_SIDE = "198.18.1.1"
BGP_CLIENT = "198.18.1.10"
BGP_VIP = "198.18.2.10"
PORT = 6443
WATCHES = 8
SHUTDOWN_GRACE = 6  # seconds: config/apilb.toml's suggestion for keepalived's 2 s x 2
DRAIN = 5           # seconds: drain_timeout (short, so a stopped gateway exits soon)
SETTLE_OK = 2.0     # requests must succeed this long before a scenario counts as over
SCENARIO_TIMEOUT = 45.0
STALL = 3.0         # client.py's: a watch without an event this long is dead
# In every namespace: each IPv4 packet sent or forwarded to an address outside the test range
# (and loopback, and link-local multicast for VRRP), and each IPv6 packet, is counted and
# dropped. The run asserts the counter stayed at 0.
GUARD = """table inet apilbha {
  set inside { type ipv4_addr; flags interval; elements = { 198.18.0.0/15, 127.0.0.0/8, 224.0.0.0/24 } }
  counter outside { }
  chain egress_out { type filter hook output priority 0; policy accept;
    meta nfproto ipv6 counter name "outside" drop; ip daddr != @inside counter name "outside" drop; }
  chain egress_fwd { type filter hook forward priority 0; policy accept;
    meta nfproto ipv6 counter name "outside" drop; ip daddr != @inside counter name "outside" drop; }
}
"""


class HarnessError(Exception):
    """The test could not be set up or driven: not a finding about apilb."""


class ScenarioFailed(Exception):
    """A scenario did not end (the address did not move, or watches or requests did not come
    back): a finding, already recorded; the scenarios after it would measure nothing."""


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent():
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: kept across `ip netns exec`'s exec


def sh(*argv, check=True, timeout=15):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"{' '.join(argv)}: timed out") from e
    if check and r.returncode != 0:
        raise HarnessError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def alive(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ha.py" in f.read()
    except OSError:
        return False


def namespaces():
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def kill_in(ns):
    """SIGKILLs what still runs in one of this test's namespaces (a dead run's processes)."""
    for pid in sh("ip", "netns", "pids", ns, check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def clean_leftovers():
    """Removes the namespaces of runs whose script is gone (killed before its cleanup could
    run), with what still runs in them; returns their names. Their temp folders stay: a run
    keeps its folder only when it failed, and then it is evidence."""
    removed = []
    for ns in namespaces():
        m = re.match(re.escape(PREFIX) + r"(\d+)[a-z]?-", ns)
        if m and not alive(int(m.group(1))):
            kill_in(ns)
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


class Topology:
    """The namespaces, the bridge and the veths of one mode; removes them all in `remove`."""

    def __init__(self, tag, mode):
        self.tag, self.mode = tag, mode
        self.ns = {}
        self.links = {}  # role -> interface names made there (besides lo)

    def name(self, role):
        return f"{self.tag}-{role}"

    def add_ns(self, role):
        ns = self.name(role)
        sh("ip", "netns", "add", ns)
        self.ns[role] = ns
        self.links[role] = set()
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Nothing of IPv6 (router solicitations, MLD): the test speaks IPv4 only.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1")
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=GUARD, text=True,
                           capture_output=True, timeout=15)
        if r.returncode != 0:
            raise HarnessError(f"nft in {ns}: {r.stderr.strip()}")
        return ns

    def outside_packets(self, ns):
        out = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "counter", "inet", "apilbha",
                 "outside")
        for item in json.loads(out).get("nftables", []):
            if "counter" in item:
                return item["counter"]["packets"]
        raise HarnessError(f"{ns}: no packet counter")

    def veth(self, role_a, name_a, role_b, name_b):
        sh("ip", "-n", self.ns[role_a], "link", "add", name_a, "type", "veth", "peer", "name",
           name_b, "netns", self.ns[role_b])
        self.links[role_a].add(name_a)
        self.links[role_b].add(name_b)
        sh("ip", "-n", self.ns[role_a], "link", "set", name_a, "up")
        sh("ip", "-n", self.ns[role_b], "link", "set", name_b, "up")

    def plug(self, role, addrs):
        """`role`'s eth0 on the bridge, with `addrs` (CIDR)."""
        self.veth(role, "eth0", "sw", role)
        sh("ip", "-n", self.ns["sw"], "link", "set", role, "master", "br0")
        for a in addrs:
            sh("ip", "-n", self.ns[role], "addr", "add", a, "dev", "eth0")

    def route(self, role, *spec):
        sh("ip", "-n", self.ns[role], "route", "add", *spec)

    def build(self):
        sw = self.add_ns("sw")
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        self.links["sw"].add("br0")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        roles = ["api", "gw1", "gw2", "client"] + (["router"] if self.mode == "bgp" else [])
        for r in roles:
            self.add_ns(r)
        self.plug("api", [f"{a}/24" for a in API_ADDRS])
        self.route("api", LAN, "dev", "eth0")
        for gw, addr in GW_ADDR.items():
            self.plug(gw, [f"{addr}/24"])
            self.route(gw, API_NET, "dev", "eth0")
        if self.mode != "bgp":
            self.plug("client", [f"{VRRP_CLIENT}/24"])
        else:
            self.plug("router", [f"{ROUTER_LAN}/24"])
            self.veth("router", "cl0", "client", "eth0")
            sh("ip", "-n", self.ns["router"], "addr", "add", f"{ROUTER_CLIENT_SIDE}/24", "dev",
               "cl0")
            sh("ip", "-n", self.ns["client"], "addr", "add", f"{BGP_CLIENT}/24", "dev", "eth0")
            # Not a default route: nothing outside the test range has anywhere to go.
            self.route("client", "198.18.0.0/16", "via", ROUTER_CLIENT_SIDE)
            sh("ip", "netns", "exec", self.ns["router"], "sysctl", "-qw",
               "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1")
            for gw in GW_ADDR:
                self.route(gw, "198.18.1.0/24", "via", ROUTER_LAN)
                sh("ip", "-n", self.ns[gw], "addr", "add", f"{BGP_VIP}/32", "dev", "lo")

    def closed_world(self):
        """Problems with the claim that no packet could leave the test's namespaces."""
        problems = []
        for role, ns in self.ns.items():
            links = {line.split(":")[1].strip().split("@")[0]
                     for line in sh("ip", "-n", ns, "-o", "link", "show").splitlines()}
            extra = links - self.links[role] - {"lo"}
            if extra:
                problems.append(f"{ns}: interfaces the test did not make: {sorted(extra)}")
            for line in sh("ip", "-n", ns, "-4", "-o", "route", "show", "table", "all").splitlines():
                tok = line.split()
                if not tok:
                    continue
                dst = tok[1] if tok[0] in ("local", "broadcast", "multicast", "unicast") else tok[0]
                if dst == "default":
                    problems.append(f"{ns}: a default route: {line}")
                    continue
                try:
                    net = ipaddress.ip_network(dst, strict=False)
                except ValueError:
                    problems.append(f"{ns}: unreadable route: {line}")
                    continue
                if not (net.subnet_of(TEST_NET) or net.subnet_of(ipaddress.ip_network("127.0.0.0/8"))):
                    problems.append(f"{ns}: a route out of {TEST_NET}: {line}")
            n = self.outside_packets(ns)
            if n:
                problems.append(f"{ns}: {n} packets for addresses outside {TEST_NET} "
                                "(dropped by the guard)")
        return problems

    def remove(self):
        for ns in self.ns.values():
            kill_in(ns)
            sh("ip", "netns", "del", ns, check=False)
        left = [n for n in namespaces() if n in self.ns.values()]
        self.ns = {}
        return left


class Procs:
    """Every process this run started, each ended by PID."""

    def __init__(self, tmp):
        self.tmp, self.started = tmp, []

    def start(self, name, ns, argv, env=None, stdin=None, stdout=None):
        log = os.path.join(self.tmp, f"{name}.log")
        logf = open(log, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdin=stdin or subprocess.DEVNULL,
                             stdout=stdout or logf, stderr=logf, env=full_env,
                             start_new_session=True, preexec_fn=_die_with_parent)
        logf.close()
        p.name, p.log = name, log
        self.started.append(p)
        return p

    def end(self, p, sig=signal.SIGTERM, wait=30):
        if p.poll() is None:
            p.send_signal(sig)
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        return p.returncode

    def end_all(self):
        end_all(self.started)


def wait_for(what, cond, timeout, step=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")


def ready_status(ns):
    out = sh("ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
             "--max-time", "1", "http://127.0.0.1:9090/readyz", check=False)
    return out.strip()


def gateway_config(pki):
    backends = "".join(
        f'\n  [[pool.backend]]\n  name = "apiserver-{i}"\n  address = "{a}:{PORT}"\n'
        for i, a in enumerate(API_ADDRS))
    return f"""# Written by tests/ha/ha.py: the same on gw1 and gw2.
[admin]
listen = "127.0.0.1:9090"
shutdown_grace = "{SHUTDOWN_GRACE}s"

[[pool]]
name = "apiservers"
balance = "least-conn"
connect_timeout = "1s"
drain_timeout = "{DRAIN}s"
{backends}
  [pool.health]
  check = "https"
  path = "/readyz"
  interval = "2s"
  timeout = "1s"
  rise = 2
  fall = 3

  [pool.tls]
  ca = "{pki}/ca.crt"
  server_name = "kubernetes"

[[listener]]
name = "passthrough"
listen = "0.0.0.0:{PORT}"
mode = "passthrough"
pool = "apiservers"
idle_timeout = "1h"
"""


def fill(text, pairs, what):
    """Replaces each (old, new) exactly once: a shipped config that no longer has the line is
    a harness error, not a silent no-op."""
    for old, new in pairs:
        if text.count(old) != 1:
            raise HarnessError(f"{what}: expected one {old!r}, found {text.count(old)}")
        text = text.replace(old, new)
    return text


def keepalived_settings():
    text = open(os.path.join(ROOT, "config", "keepalived.conf")).read()

    def num(key):
        m = re.search(rf"^\s*{key}\s+(\d+)", text, re.M)
        if not m:
            raise HarnessError(f"config/keepalived.conf: no {key}")
        return int(m.group(1))

    return {k: num(k) for k in ("interval", "fall", "rise", "advert_int", "timeout")}


def keepalived_config(gw, nopreempt=False):
    """The shipped file with the test's VIP; gw2 as its comments say. `nopreempt` (a variant
    the full run measures, not the shipped file): both BACKUP with `nopreempt`, so a gateway
    that comes back does not take the address back."""
    text = open(os.path.join(ROOT, "config", "keepalived.conf")).read()
    pairs = [("192.168.1.10/24", f"{VRRP_VIP}/24")]
    if gw == "gw2":
        # The priorities as the file has them: its own line, and the one its comment gives gw2.
        mine = re.search(r"^\s*priority (\d+)", text, re.M)
        second = re.search(r"set state BACKUP and priority (\d+)", text)
        if not (mine and second):
            raise HarnessError("config/keepalived.conf: no priority, or no comment with gw2's")
        pairs += [("router_id apilb-gw1", "router_id apilb-gw2"),
                  (f"priority {mine.group(1)}\n", f"priority {second.group(1)}\n")]
    if nopreempt:
        pairs += [("state MASTER", "state BACKUP\n    nopreempt")]
    elif gw == "gw2":
        pairs += [("state MASTER", "state BACKUP")]
    return fill(text, pairs, "config/keepalived.conf")


def exabgp_settings():
    text = open(os.path.join(ROOT, "config", "exabgp", "exabgp.conf")).read()
    out = {}
    for key in ("interval", "fall", "rise"):
        m = re.search(rf"--{key} (\d+)", text)
        if not m:
            raise HarnessError(f"config/exabgp/exabgp.conf: no --{key}")
        out[key] = int(m.group(1))
    return out


def exabgp_config(gw):
    text = open(os.path.join(ROOT, "config", "exabgp", "exabgp.conf")).read()
    addr = GW_ADDR[gw]
    return fill(text, [("--ip 203.0.113.10/32", f"--ip {BGP_VIP}/32"),
                       ("neighbor 192.0.2.1 {", f"neighbor {ROUTER_LAN} {{"),
                       ("router-id 192.0.2.11;", f"router-id {addr};"),
                       ("local-address 192.0.2.11;", f"local-address {addr};")],
                "config/exabgp/exabgp.conf")


def router_bird_config(ctl_log):
    peers = "".join(
        f"protocol bgp {gw} from gateways {{ neighbor {addr} as 64512; }}\n"
        for gw, addr in GW_ADDR.items())
    return f"""# Written by tests/ha/ha.py: the upstream router, with ECMP over the gateways.
log "{ctl_log}" all;
router id {ROUTER_LAN};
protocol device {{ scan time 1; }}
protocol kernel {{
    ipv4 {{ import none; export all; }};
    merge paths on;   # equal BGP routes from both gateways become one multipath route
}}
template bgp gateways {{
    local {ROUTER_LAN} as 64512;
    direct;   # the gateways are on the bridge: next hops as they come
    hold time 9;
    ipv4 {{ import all; export none; gateway direct; }};
}}
{peers}"""


class Client:
    """tests/ha/client.py in the client namespace, its events collected as they come."""

    def __init__(self, procs, ns, vip, pki, watches):
        self.events, self.lock = [], threading.Lock()
        self.watches = watches
        self.record = open(os.path.join(procs.tmp, "client-events.jsonl"), "wb")
        self.p = procs.start("client", ns, [sys.executable, os.path.join(HERE, "client.py"),
                                            "--vip", vip, "--pki", pki, "--watches", str(watches)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append(ev)
            self.record.write(line)

    def since(self, t):
        with self.lock:
            return [e for e in self.events if e.get("t0", e.get("t", 0)) >= t]

    def watches_up(self):
        state = {}
        with self.lock:
            for e in self.events:
                if e["k"] in ("watch_up", "watch_end"):
                    state[e["i"]] = e["k"] == "watch_up"
        return sum(state.values())

    def ok_for(self, seconds):
        """Every request of the last `seconds` succeeded (and there were some)."""
        now = time.monotonic()
        recent = [e for e in self.since(now - seconds) if e["k"] == "req"]
        return len(recent) >= seconds * 10 and all(e["ok"] for e in recent)

    def stop(self, procs):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        procs.end(self.p, wait=10)


class Holder:
    """Polls where the address is: the gateways that hold the VIP (VRRP) or that the router's
    route to it goes through (BGP); records every change with its time."""

    def __init__(self, topo, mode):
        self.topo, self.mode = topo, mode
        self.changes, self.lock = [], threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def look(self):
        if self.mode != "bgp":
            return frozenset(
                gw for gw in GW_ADDR
                if f" {VRRP_VIP}/" in sh("ip", "-n", self.topo.ns[gw], "-o", "-4", "addr", "show",
                                         "dev", "eth0", check=False))
        out = sh("ip", "-n", self.topo.ns["router"], "-4", "route", "show", f"{BGP_VIP}/32",
                 check=False)
        return frozenset(gw for gw, a in GW_ADDR.items() if f"via {a} " in out + " ")

    def _run(self):
        last = None
        while not self.done.is_set():
            try:
                now = self.look()
            except HarnessError:
                now = last
            if now != last:
                with self.lock:
                    self.changes.append((time.monotonic(), now))
                last = now
            self.done.wait(0.05)

    def current(self):
        with self.lock:
            return self.changes[-1][1] if self.changes else frozenset()

    def first_change_to(self, want, after):
        with self.lock:
            for t, h in self.changes:
                if t >= after and h == want:
                    return t
        return None

    def window(self, after, want):
        """When the address started to move after `after` (its first change) and when it
        reached `want`; None for each that did not happen."""
        with self.lock:
            changes = [(t, h) for t, h in self.changes if t >= after]
        start = changes[0][0] if changes else None
        end = next((t for t, h in changes if h == want), None)
        return start, end

    def stop(self):
        self.done.set()
        self.thread.join(timeout=2)


def summarise(name, events, t0, t1, holder, want, watches):
    reqs = [e for e in events if e["k"] == "req" and t0 <= e["t0"] <= t1]
    failed = [e for e in reqs if not e["ok"]]
    kinds = {}
    for e in failed:
        kinds[e["err"]] = kinds.get(e["err"], 0) + 1
    ends = [e for e in events if e["k"] == "watch_end" and t0 <= e["t"] <= t1]
    why = {}
    for e in ends:
        why[e["why"]] = why.get(e["why"], 0) + 1
    ended_ids = {e["i"] for e in ends}
    ups = [e for e in events if e["k"] == "watch_up" and t0 <= e["t"] <= t1 and e["i"] in ended_ids]
    back = None
    if failed:
        last_fail = max(e["t0"] for e in failed)
        after = [e["t1"] for e in reqs if e["ok"] and e["t0"] > last_fail]
        back = (min(after) - t0) if after else None
    moved = holder.first_change_to(want, t0)
    # A request whose connection is open at the instant the address moves has its next
    # packets land on the other gateway, which resets them: no setting prevents that.
    w0, w1 = holder.window(t0, want)
    cut = [e for e in failed if w0 is not None and w1 is not None
           and e["t0"] <= w1 and e["t1"] >= w0 - 0.05]
    reup = []
    for e in ends:
        later = [u["t"] for u in ups if u["i"] == e["i"] and u["t"] >= e["t"]]
        if later:
            reup.append(min(later) - e["t"])
    return {
        "scenario": name,
        "moved_s": round(moved - t0, 2) if moved is not None else None,
        "requests": len(reqs),
        "failed": len(failed),
        "failed_by_kind": kinds,
        "cut_by_move": len(cut),
        "move_window_s": round(w1 - w0, 2) if w0 is not None and w1 is not None else None,
        "delayed": sum(1 for e in reqs if e["ok"] and e["t1"] - e["t0"] > 0.5),
        "request_max_s": round(max((e["t1"] - e["t0"] for e in reqs), default=0), 2),
        "first_failure_s": round(min(e["t0"] for e in failed) - t0, 2) if failed else None,
        "back_s": round(back, 2) if back is not None else None,
        "watches": watches,
        "watches_ended": len(ends),
        "watches_ended_by": why,
        "watches_reestablished": len({u["i"] for u in ups}),
        "watch_gap_max_s": round(max(reup), 2) if reup else None,
        "settled_s": round(t1 - t0, 2),
    }


class Run:
    def __init__(self, args, mode, tmp):
        self.args, self.mode, self.tmp = args, mode, tmp
        self.tag = f"{PREFIX}{os.getpid()}{mode[0]}"
        self.topo = Topology(self.tag, mode)
        self.procs = Procs(tmp)
        self.gw = {}
        self.results, self.failures, self.notes = [], [], []
        self.holder = self.client = None

    # --- setup -------------------------------------------------------------------------
    def start_gateway(self, gw):
        p = self.procs.start(f"apilb-{gw}", self.topo.ns[gw],
                             [self.args.apilb, "run", "--config", self.cfg])
        self.gw[gw] = p
        wait_for(f"{gw}'s /readyz", lambda: p.poll() is not None
                 or ready_status(self.topo.ns[gw]) == "200", 20)
        if p.poll() is not None:
            raise HarnessError(f"apilb in {gw} exited {p.returncode}: {log_tail(p.log)}")

    def setup(self):
        self.topo.build()
        pki = os.path.join(self.tmp, "pki")
        api = self.procs.start("apiservers", self.topo.ns["api"],
                               [self.args.apilb, "demo-apiserver", "--dir", pki]
                               + sum((["--listen", f"{a}:{PORT}"] for a in API_ADDRS), []))
        wait_for("the simulated apiservers", lambda: open(api.log).read().count("apiserver-") >= 3
                 or api.poll() is not None, 20)
        if api.poll() is not None:
            raise HarnessError(f"apilb demo-apiserver exited {api.returncode}: {log_tail(api.log)}")
        self.cfg = os.path.join(self.tmp, "apilb.toml")
        with open(self.cfg, "w") as f:
            f.write(gateway_config(pki))
        for gw in GW_ADDR:
            self.start_gateway(gw)
        if self.mode != "bgp":
            self.vip = VRRP_VIP
            for gw in GW_ADDR:
                conf = os.path.join(self.tmp, f"keepalived-{gw}.conf")
                with open(conf, "w") as f:
                    f.write(keepalived_config(gw, self.mode == "nopreempt"))
                pid = lambda what: os.path.join(self.tmp, f"keepalived-{gw}{what}.pid")  # noqa: E731
                self.procs.start(f"keepalived-{gw}", self.topo.ns[gw],
                                 ["keepalived", "--dont-fork", "--log-console", "--log-detail",
                                  "--vrrp", "-f", conf, "-p", pid(""), "-r", pid("-vrrp"),
                                  "-c", pid("-checkers")])
            self.baseline = frozenset({"gw1"})
        else:
            self.vip = BGP_VIP
            bird_conf = os.path.join(self.tmp, "router-bird.conf")
            with open(bird_conf, "w") as f:
                f.write(router_bird_config(os.path.join(self.tmp, "router-bird.log")))
            self.procs.start("bird-router", self.topo.ns["router"],
                             ["bird", "-f", "-c", bird_conf, "-s",
                              os.path.join(self.tmp, "router-bird.ctl"), "-P",
                              os.path.join(self.tmp, "router-bird.pid")])
            for gw in GW_ADDR:
                conf = os.path.join(self.tmp, f"exabgp-{gw}.conf")
                with open(conf, "w") as f:
                    f.write(exabgp_config(gw))
                # Per-namespace state: no shared named pipes, no privilege drop (the
                # healthcheck would then fail to check the VIP on lo), logs to stdout.
                self.procs.start(f"exabgp-{gw}", self.topo.ns[gw], ["exabgp", conf], env={
                    "exabgp.api.cli": "false", "exabgp.daemon.user": "root",
                    "exabgp.daemon.daemonize": "false", "exabgp.log.destination": "stdout",
                    "exabgp.daemon.pid": os.path.join(self.tmp, f"exabgp-{gw}.pid")})
            self.baseline = frozenset(GW_ADDR)
        self.holder = Holder(self.topo, self.mode)
        wait_for(f"the address on {sorted(self.baseline)}",
                 lambda: self.holder.current() == self.baseline, 30)
        self.client = Client(self.procs, self.topo.ns["client"], self.vip, pki, self.args.watches)
        wait_for("every watch up and requests succeeding",
                 lambda: self.client.watches_up() == self.args.watches and self.client.ok_for(1.0), 20)

    # --- scenarios ---------------------------------------------------------------------
    def scenario(self, name, action, want, check=None):
        print(f"[{self.mode}] {name} ...", flush=True)
        held = {gw: self.active(gw) for gw in GW_ADDR}
        t0 = time.monotonic()
        extra = action() or {}
        try:
            wait_for(f"{name}: the address on {sorted(want)}",
                     lambda: self.holder.current() == want, SCENARIO_TIMEOUT)
            # A watch whose gateway lost the address learns it only by hearing nothing for STALL.
            time.sleep(STALL + 1)
            wait_for(f"{name}: every watch up and {SETTLE_OK:.0f}s of good requests",
                     lambda: self.client.watches_up() == self.args.watches
                     and self.client.ok_for(SETTLE_OK), SCENARIO_TIMEOUT)
        except HarnessError as e:
            self.expect(False, f"{e} (watches up: {self.client.watches_up()}, address on "
                        f"{sorted(self.holder.current())})")
            raise ScenarioFailed() from e
        t1 = time.monotonic()
        r = summarise(name, self.client.since(t0), t0, t1, self.holder, want, self.args.watches)
        r["mode"] = self.mode
        r["open_before"] = held  # client connections each gateway held: the watches
        r.update(extra() if callable(extra) else extra)
        self.results.append(r)
        print("   " + json.dumps(r), flush=True)
        if check:
            check(r)
        return r

    def active(self, gw):
        """apilb_listener_active_connections of `gw`'s apilb, or None when it does not answer."""
        out = sh("ip", "netns", "exec", self.topo.ns[gw], "curl", "-s", "--max-time", "1",
                 "http://127.0.0.1:9090/metrics", check=False)
        m = re.search(r'^apilb_listener_active_connections\{[^}]*\} (\d+)', out, re.M)
        return int(m.group(1)) if m else None

    def expect(self, ok, what):
        if not ok:
            self.failures.append(f"[{self.mode}] {what}")
            print(f"   FAIL: {what}", flush=True)

    def planned_stop(self):
        p = self.gw["gw1"]
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)

        def after():
            # Waits only: a second SIGTERM would skip the rest of the grace and the drain.
            try:
                rc = p.wait(timeout=SHUTDOWN_GRACE + DRAIN + 15)
            except subprocess.TimeoutExpired:
                rc = None
            return {"apilb_exit": rc, "apilb_exit_s": round(time.monotonic() - t0, 2)}
        return after

    def kill(self):
        self.gw["gw1"].send_signal(signal.SIGKILL)
        self.gw["gw1"].wait(timeout=5)

    def restart(self):
        self.start_gateway("gw1")

    def route_out(self):
        sh("ip", "-n", self.topo.ns["gw1"], "route", "del", API_NET, "dev", "eth0")

        def after():
            return {"gw1_readyz_during": self.readyz_seen}
        self.readyz_seen = ready_status(self.topo.ns["gw1"])
        threading.Thread(target=self._watch_readyz, daemon=True).start()
        return after

    def _watch_readyz(self):
        for _ in range(200):
            s = ready_status(self.topo.ns["gw1"])
            if s != "200":
                self.readyz_seen = s
                return
            time.sleep(0.1)

    def route_back(self):
        self.topo.route("gw1", API_NET, "dev", "eth0")

    def run(self, short):
        self.setup()
        gw2_only = frozenset({"gw2"})
        ka, eb = keepalived_settings(), exabgp_settings()
        if self.mode != "bgp":
            detect = ka["interval"] * ka["fall"]
            bound = detect + 3 * ka["advert_int"] + 1
            self.notes.append(
                f"keepalived: interval {ka['interval']} x fall {ka['fall']} = {detect} s to "
                f"notice, advert_int {ka['advert_int']}: bound {bound} s "
                "(interval x fall + 3 x advert_int + 1 s of skew)")
        else:
            detect = eb["interval"] * eb["fall"]
            bound = detect + 2
            self.notes.append(
                f"exabgp healthcheck: interval {eb['interval']} x fall {eb['fall']} = {detect} s "
                f"to notice: bound {bound} s (interval x fall + 2 s for the update and the "
                "router's FIB)")

        def s1(r):
            refused = r["failed_by_kind"].get("refused", 0)
            self.expect(refused == 0, f"planned stop: {refused} short requests refused, want 0")
            self.expect(r["failed"] - r["cut_by_move"] == 0,
                        f"planned stop: {r['failed']} short requests failed "
                        f"({r['failed_by_kind']}), {r['cut_by_move']} of them open as the "
                        "address moved; want 0 others")
            self.expect(r["cut_by_move"] <= 2, f"planned stop: {r['cut_by_move']} requests cut "
                        "by the move; a request every 50 ms has one or two open at a time")
            self.expect(r["moved_s"] is not None and r["moved_s"] < SHUTDOWN_GRACE,
                        f"planned stop: the address moved after {r['moved_s']} s, not within the "
                        f"{SHUTDOWN_GRACE} s grace")
            self.expect(r.get("apilb_exit") == 0, f"planned stop: apilb exited {r.get('apilb_exit')}")

        def s2(r):
            self.expect(r["failed"] > 0 and r["back_s"] is not None and r["back_s"] <= bound,
                        f"SIGKILL: {r['failed']} requests failed, back after {r['back_s']} s, "
                        f"bound {bound} s")

        self.scenario("1 planned stop (SIGTERM, grace)", self.planned_stop, gw2_only, s1)
        if self.mode == "nopreempt":
            # The address stays on gw2: nothing moves, nothing may fail, no watch may end.
            def s4(r):
                self.expect(r["failed"] == 0 and r["watches_ended"] == 0,
                            f"nopreempt comeback: {r['failed']} failed, {r['watches_ended']} "
                            "watches ended, want 0 and 0")
            def back_and_wait():
                self.restart()
                # Past keepalived's rise on gw1: time it would have taken the address back.
                time.sleep(ka["interval"] * ka["rise"] + 2)
            self.scenario("4 comes back (nopreempt)", back_and_wait, gw2_only, s4)
            return
        self.scenario("4 comes back after the planned stop", self.restart, self.baseline)
        if short and self.mode == "bgp":
            return
        self.scenario("2 apilb SIGKILLed", self.kill, gw2_only, s2)
        self.scenario("4 comes back after SIGKILL", self.restart, self.baseline)
        if not short:
            self.scenario("3 backends unreachable from gw1", self.route_out, gw2_only)
            self.scenario("4 comes back: route restored", self.route_back, self.baseline)

    def finish(self):
        if self.client:
            self.client.stop(self.procs)
        if self.holder:
            self.holder.stop()
        problems = self.topo.closed_world() if self.topo.ns else []
        for p in problems:
            self.expect(False, p)
        self.procs.end_all()
        left = self.topo.remove()
        self.expect(not left, f"namespaces left behind: {left}")
        still = [p.name for p in self.procs.started if p.poll() is None]
        self.expect(not still, f"processes left running: {still}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="CI: fewer scenarios, same assertions")
    ap.add_argument("--mode", choices=["vrrp", "nopreempt", "bgp", "both"], default="both",
                    help="both: vrrp and bgp, and with a full run nopreempt too")
    ap.add_argument("--apilb", default=os.path.join(ROOT, "target", "release", "apilb"))
    ap.add_argument("--watches", type=int, default=WATCHES)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, configs)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("ha.py: network namespaces need root", file=sys.stderr)
        return 2
    for tool in ["ip", "nft", "curl", "keepalived", "bird", "exabgp"]:
        if shutil.which(tool) is None:
            print(f"ha.py: {tool} is missing", file=sys.stderr)
            return 2
    if not os.access(args.apilb, os.X_OK):
        print(f"ha.py: no apilb at {args.apilb} (cargo build --release)", file=sys.stderr)
        return 2
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    removed = clean_leftovers()
    if removed:
        print(f"removed what an earlier run left: {removed}")
    tmp = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    modes = ["vrrp", "bgp"] if args.mode == "both" else [args.mode]
    if args.mode == "both" and not args.short:
        modes.insert(1, "nopreempt")
    report = {"short": args.short, "results": [], "notes": [], "failures": [], "harness_error": None}
    code = 0
    completed = False
    try:
        for mode in modes:
            run = Run(args, mode, os.path.join(tmp, mode))
            os.makedirs(run.tmp)
            try:
                run.run(args.short)
            except ScenarioFailed:
                for p in run.procs.started:
                    print(f"--- {p.name} (exit {p.poll()}):\n{log_tail(p.log, 1500)}", file=sys.stderr)
            except HarnessError as e:
                report["harness_error"] = f"[{mode}] {e}"
                print(f"harness error: [{mode}] {e}", file=sys.stderr)
                for p in run.procs.started:
                    print(f"--- {p.name} (exit {p.poll()}):\n{log_tail(p.log, 1500)}", file=sys.stderr)
            finally:
                run.finish()
                report["results"] += run.results
                report["notes"] += run.notes
                report["failures"] += run.failures
        completed = True
    finally:
        if not completed:
            report["failures"].append("interrupted")
        left = [n for n in namespaces() if n.startswith(f"{PREFIX}{os.getpid()}")]
        if left:
            report["failures"].append(f"namespaces left: {left}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        if report["harness_error"]:
            code = 2
        elif report["failures"]:
            code = 1
        if code == 0 and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and configs kept in {tmp}")
    for n in report["notes"]:
        print("note: " + n)
    for f in report["failures"]:
        print("FAIL: " + f)
    print("PASS" if code == 0 else ("HARNESS ERROR" if code == 2 else "FAIL"))
    return code


if __name__ == "__main__":
    sys.exit(main())
