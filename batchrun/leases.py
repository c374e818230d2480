"""Leases: the locks of a run state kept on an object store, where there is no ``flock``.

A lease is a small JSON object: its holder (pid, host, since; and, on Linux, the boot id, pid
namespace and start time that let a process on the same host tell a dead holder at once), a
random token and an expiry by the holder's clock. ``s3state.S3RunState.lock`` takes, renews and
releases them; this module says what a lease holds and whether one still guards anything.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

# Tokens of the leases this process holds or is taking, by key: a second ``lock`` of the same name
# from this process is refused as flock refuses it, and a lease naming this process whose token
# is not here is a leftover of ours (a release that could not reach the store).
HELD: dict[str, set[str]] = {}
HELD_LOCK = threading.Lock()


def register(key: str, token: str) -> None:
    """Note a lease this process is taking (and, once taken, holds)."""
    with HELD_LOCK:
        HELD.setdefault(key, set()).add(token)


def this_process() -> dict[str, Any]:
    """Who we are, as a lease records it; ``boot``, ``pidns`` and ``start`` let another process
    on this host tell whether the holder is still alive (Linux; elsewhere they are empty)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot": _read_text("/proc/sys/kernel/random/boot_id"),
        "pidns": _pidns(),
        "start": _start_time(os.getpid()),
    }


def lease_doc(token: str, ttl_s: float, since: str | None = None) -> dict[str, Any]:
    now = time.time()
    return {
        **this_process(),
        "token": token,
        "since": since or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "renewed_at": now,
        "expires_at": now + ttl_s,
    }


def forget(key: str, token: str) -> None:
    with HELD_LOCK:
        tokens = HELD.get(key, set())
        tokens.discard(token)
        if not tokens:
            HELD.pop(key, None)


def holder_of(lease: dict[str, Any] | None) -> str:
    if lease is None:
        return "unknown process"
    return f"pid {lease.get('pid')} on {lease.get('host')} since {lease.get('since')}"


def lease_gone(key: str, lease: dict[str, Any]) -> bool:
    """Whether a lease no longer guards anything: expired, or its holder on this host has ended."""
    expires = lease.get("expires_at")
    if not isinstance(expires, (int, float)) or time.time() > expires:
        return True
    me = this_process()
    if not me["boot"] or lease.get("boot") != me["boot"] or lease.get("pidns") != me["pidns"]:
        return False  # another host (or container): only the expiry can tell
    pid = lease.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == me["pid"] and lease.get("start") == me["start"]:
        with HELD_LOCK:
            return lease.get("token") not in HELD.get(key, ())  # ours only while we hold or take it
    return _start_time(pid) != lease.get("start")  # ended (or its pid reused by another process)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pidns() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""
