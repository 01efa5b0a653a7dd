#!/usr/bin/env python3
"""The client side of the HA test (tests/ha/ha.py starts it inside the `client` network
namespace): a loop of short HTTPS requests and a set of held watches, all to the virtual IP,
each outcome printed as one JSON line on stdout with CLOCK_MONOTONIC times (the same clock
as the controller's: network namespaces do not change it).

Short requests: every --interval seconds (each in its own thread) one new TCP connection, a TLS handshake with the
admin client certificate (passthrough: the apiserver checks it), `GET /whoami`, the whole
answer read, closed; like one `kubectl get`. Printed: {"k": "req", "t0", "t1", "ok",
"err", "backend"}. `err` is "refused" (a SYN answered by a reset: nothing listening),
"reset" (an established connection reset), "timeout" (CONNECT_TIMEOUT to connect,
REQUEST_TIMEOUT in all), "eof" (closed before the answer was complete), "status N", or another OSError's errno name.

Watches: --watches threads, each holding `GET /api/v1/namespaces/default/pods?watch=1`,
whose events come every second. A watch that ends ("eof": the connection was closed; "reset";
"stalled": no byte for STALL seconds) is printed as {"k": "watch_end", "i", "t", "why",
"backend", "age"} and re-opened after RETRY seconds, like a reflector; once its first event
arrives it is printed as {"k": "watch_up", "i", "t", "backend"}.

Standard library only. Runs until SIGTERM or until its stdin closes (the controller died),
bounded by --max-seconds in any case.
"""

import argparse
import errno
import json
import os
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time

STALL = 3.0  # watch events come every 1 s: three missing is a dead watch
RETRY = 0.2  # between a watch's end and its next attempt
# Long enough for a SYN retransmission (1 s, then 3 s): the moment an address moves, a SYN
# may meet neither gateway; kubectl's dial timeout is 30 s.
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0

_out = threading.Lock()
stop = threading.Event()


def emit(obj):
    line = json.dumps(obj, separators=(",", ":"))
    with _out:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            stop.set()


def classify(e):
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ssl.SSLEOFError):
        return "eof"
    if isinstance(e, ssl.SSLError):
        return "tls: " + (e.reason or str(e))
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def tls_context(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(pki, "ca.crt"))
    ctx.load_cert_chain(os.path.join(pki, "admin.crt"), os.path.join(pki, "admin.key"))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def open_tls(ctx, vip, port, timeout):
    raw = socket.create_connection((vip, port), timeout=CONNECT_TIMEOUT)
    try:
        raw.settimeout(timeout)
        # The apiserver certificate names `kubernetes`, not the test's addresses.
        return ctx.wrap_socket(raw, server_hostname="kubernetes")
    except BaseException:
        raw.close()
        raise


def read_response(s, deadline):
    """The status and body of one HTTP/1.1 answer with a Content-Length, read whole."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline or len(buf) > 65536:
            raise TimeoutError()
        chunk = s.recv(4096)
        if not chunk:
            raise ssl.SSLEOFError()
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    want = int(m.group(1)) if m else 0
    while len(body) < want:
        if time.monotonic() > deadline:
            raise TimeoutError()
        chunk = s.recv(4096)
        if not chunk:
            raise ssl.SSLEOFError()
        body += chunk
    return status, body


def drain_to_eof(s, deadline):
    """Reads what the server sends after its answer (session tickets, close_notify) until it
    closes: a socket closed with unread bytes sends a reset, which the gateway would log as
    a connection error, and a real client does not cause."""
    try:
        while time.monotonic() < deadline and s.recv(4096):
            pass
    except OSError:
        pass


def short_request(ctx, vip, port):
    t0 = time.monotonic()
    rec = {"k": "req", "t0": t0, "ok": False, "err": None, "backend": None}
    s = None
    try:
        s = open_tls(ctx, vip, port, REQUEST_TIMEOUT)
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n")
        status, body = read_response(s, t0 + REQUEST_TIMEOUT)
        drain_to_eof(s, time.monotonic() + 1.0)
        if status == 200:
            rec["ok"] = True
            try:
                rec["backend"] = json.loads(body).get("backend")
            except ValueError:
                pass
        else:
            rec["err"] = f"status {status}"
    except Exception as e:  # every failure is a measurement, never a crash
        rec["err"] = classify(e)
    finally:
        if s is not None:
            try:
                s.close()
            except OSError:
                pass
    rec["t1"] = time.monotonic()
    emit(rec)


MAX_OPEN = 64  # short requests open at once; beyond it a tick is skipped (and printed)


def short_loop(ctx, vip, port, interval):
    """One request every `interval` on a fixed schedule, each in a thread of its own, so a
    request stuck until its timeout does not hold back the ones after it (which would hide
    how soon the others succeed again)."""
    nxt = time.monotonic()
    open_now = threading.BoundedSemaphore(MAX_OPEN)

    def one():
        try:
            short_request(ctx, vip, port)
        finally:
            open_now.release()

    while not stop.is_set():
        if open_now.acquire(blocking=False):
            threading.Thread(target=one, daemon=True).start()
        else:
            emit({"k": "skipped", "t": time.monotonic()})
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            nxt = time.monotonic()


BACKEND = re.compile(rb'"apilb.demo/backend":"([^"]+)"')


def watch_loop(i, ctx, vip, port):
    while not stop.is_set():
        s = None
        up_at = None
        backend = None
        why = None
        try:
            s = open_tls(ctx, vip, port, STALL)
            s.sendall(b"GET /api/v1/namespaces/default/pods?watch=1 HTTP/1.1\r\n"
                      b"Host: kubernetes\r\n\r\n")
            while not stop.is_set():
                chunk = s.recv(65536)
                if not chunk:
                    why = "eof"
                    break
                if up_at is None:
                    m = BACKEND.search(chunk)
                    if m:
                        up_at = time.monotonic()
                        backend = m.group(1).decode()
                        emit({"k": "watch_up", "i": i, "t": up_at, "backend": backend})
        except Exception as e:
            why = classify(e)
            if why == "timeout":
                why = "stalled"
        finally:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        if stop.is_set():
            return
        if up_at is not None:
            now = time.monotonic()
            emit({"k": "watch_end", "i": i, "t": now, "why": why, "backend": backend,
                  "age": now - up_at})
        stop.wait(RETRY)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, default=6443)
    ap.add_argument("--pki", required=True, help="folder with ca.crt, admin.crt, admin.key")
    ap.add_argument("--watches", type=int, default=8)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between short requests")
    ap.add_argument("--max-seconds", type=float, default=900)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ctx = tls_context(a.pki)
    threads = [threading.Thread(target=short_loop, args=(ctx, a.vip, a.port, a.interval),
                                daemon=True)]
    threads += [threading.Thread(target=watch_loop, args=(i, ctx, a.vip, a.port), daemon=True)
                for i in range(a.watches)]
    for t in threads:
        t.start()
    emit({"k": "started", "t": time.monotonic()})
    end = time.monotonic() + a.max_seconds
    while not stop.is_set() and time.monotonic() < end:
        # stdin is the controller's pipe: EOF means it is gone, and so must this be.
        r, _, _ = select.select([sys.stdin], [], [], 0.5)
        if r and not sys.stdin.buffer.read1(4096):
            break
    stop.set()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT + STALL)
    emit({"k": "stopped", "t": time.monotonic()})


if __name__ == "__main__":
    main()
