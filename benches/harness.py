"""Process helpers shared by benches/compare.py and benches/soak.py: ending every process a
script started (by PID, bounded, deaf to a second Ctrl-C while it runs), turning signals
into an unwinding exit, and reading the end of a process's log."""

import os
import signal
import subprocess
import time


def end_all(started, cont=False):
    """Ends every process of `started` that still runs: SIGCONT first when `cont` (a stopped
    process would not act on SIGTERM), SIGTERM, then SIGKILL for any still running 10 s
    later. Signals are ignored meanwhile, so a second Ctrl-C cannot cut it short and leave
    processes behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        for p in started:
            if p.poll() is None:
                for s in ((signal.SIGCONT,) if cont else ()) + (signal.SIGTERM,):
                    try:
                        p.send_signal(s)
                    except OSError:
                        pass
        deadline = time.monotonic() + 10
        for p in started:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
    finally:
        for s, h in old.items():
            if h is not None:
                signal.signal(s, h)


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks, which end what was started


def log_tail(path, chars=2000):
    """The last `chars` of the file at `path`, or "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - chars))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""
