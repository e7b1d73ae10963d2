"""One driver per run: a lease record in the run's storage, so a second launch of the same run (same config,
storage and tracking) is refused instead of training into the same checkpoints and MLflow run.

The lease is `<run>/lease.json` = {owner, host, pid, pid_start, command, started, heartbeat, ttl}, created
with a conditional write (S3 If-None-Match, a file lock on local paths) so exactly one launch wins. The
holder renews its heartbeat every `interval` seconds. A lease is stale, and a new launch takes it over (a
conditional replace, again one winner), when its heartbeat is older than its ttl, or at once when its driver
ran on this host and that process is gone: so a run whose driver died can be resumed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from .errors import ExperimentError
from .rundir import RunDir

TTL_S = float(os.environ.get("TARFLOW_LEASE_TTL_S", 120))
INTERVAL_S = float(os.environ.get("TARFLOW_LEASE_INTERVAL_S", 30))


class LeaseHeld(ExperimentError):
    """Another live driver holds the run."""


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), to tell a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def driver_alive(record: dict) -> bool | None:
    """Whether the holder's process still runs: True/False on this host, None (unknown) elsewhere."""
    if record.get("host") != socket.gethostname():
        return None
    return process_start(int(record.get("pid", -1))) == record.get("pid_start")


def is_stale(record: dict, now: float | None = None) -> bool:
    alive = driver_alive(record)
    if alive is False:
        return True
    return (now or time.time()) - float(record.get("heartbeat", 0)) > float(record.get("ttl", TTL_S))


class RunLease:
    """with RunLease(rundir, "orchestrator.run of table2/..."): ... — held for the block, renewed meanwhile."""

    def __init__(self, rundir: RunDir, purpose: str, ttl: float = TTL_S, interval: float = INTERVAL_S):
        self.storage, self.relpath, self.purpose = rundir.storage, rundir.lease_path, purpose
        self.ttl, self.interval = ttl, interval
        self.owner = uuid.uuid4().hex
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def record(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": process_start(os.getpid()), "purpose": self.purpose,
                "command": " ".join(sys.argv)[:500], "ttl": self.ttl, "heartbeat": time.time(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def acquire(self) -> RunLease:
        for _ in range(5):  # each pass either wins, refuses, or lost a race to a writer that just changed it
            data = json.dumps(self.record()).encode()
            current = self.storage.read_versioned(self.relpath)
            if current is None:
                if self.storage.create_if_absent(self.relpath, data):
                    return self._held()
                continue
            held = json.loads(current[0])
            if not is_stale(held):
                raise LeaseHeld(self.describe_holder(held))
            if self.storage.replace_if_version(self.relpath, data, current[1]):
                print(f"[orchestrator] took over the stale lease of {self.relpath} (driver pid {held.get('pid')} on "
                      f"{held.get('host')}, last heartbeat {time.time() - float(held['heartbeat']):.0f} s ago)",
                      flush=True)
                return self._held()
        raise LeaseHeld(f"could not take the lease {self.storage.describe()}/{self.relpath}: other launches keep "
                        "changing it; is the same run being started in a loop?")

    def describe_holder(self, held: dict) -> str:
        age = time.time() - float(held.get("heartbeat", 0))
        alive = driver_alive(held)
        state = "running" if alive else f"last heartbeat {age:.0f} s ago"
        return (f"this run is already being driven by another launch ({held.get('purpose', '?')}: pid "
                f"{held.get('pid')} on {held.get('host')}, started {held.get('started')}, {state}; lease "
                f"{self.storage.describe()}/{self.relpath}). Two drivers would train into the same checkpoints "
                f"and MLflow run. Wait for it to end or stop it; if its driver died, this command resumes the run "
                f"once the lease is stale ({float(held.get('ttl', TTL_S)):.0f} s after its last heartbeat, at once "
                f"on the same host)")

    def _held(self) -> RunLease:
        self._version = self.storage.read_versioned(self.relpath)[1]
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                ok = self.storage.replace_if_version(self.relpath, json.dumps(self.record()).encode(), self._version)
                if not ok:
                    self.lost = True
                    print(f"[orchestrator] WARNING: lost the lease {self.relpath} to another launch", flush=True)
                    return
                self._version = self.storage.read_versioned(self.relpath)[1]
            except Exception as e:  # storage blips: the ttl leaves room for the next renewal
                print(f"[orchestrator] could not renew the lease {self.relpath} ({type(e).__name__}); retrying",
                      flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._version is not None and not self.lost:
            try:
                current = self.storage.read_versioned(self.relpath)
                if current is not None and json.loads(current[0]).get("owner") == self.owner:
                    self.storage.delete(self.relpath)
            except Exception:  # an unreleased lease goes stale on its own
                pass
        self._version = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
