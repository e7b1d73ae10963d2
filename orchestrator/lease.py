"""One driver per run: a lease record in the run's storage, so a second launch of the same run (same config,
storage and tracking) is refused instead of training into the same checkpoints and MLflow run.

The lease is `<run>/lease.json` = {owner, host, pid, pid_start, purpose, command (credentials redacted), started,
heartbeat, beat, ttl, interval}, created with a conditional write (S3 If-None-Match, a file lock on local paths)
and read back, so exactly one launch wins. The holder renews it every `interval` seconds, each renewal a new
`beat`. No clock is compared with another host's: a checker calls a lease stale when the record has not changed
for `ttl` seconds of its own monotonic clock, and then takes it over (a conditional replace, one winner). On the
holder's own host, where both clocks are one, a live holder with a heartbeat younger than the ttl is refused at
once, and a holder whose process is gone is stale at once: a run whose driver died resumes without waiting.

The holder reads the record before each renewal and after each write. When another launch holds it, the lease is
lost: whoever watches is told (lifecycle.py tells the run's RunBoard: the workers stop, the launch ends in one
paragraph). The workers trust the lease only for `ttl - interval` seconds after the renewal the driver last
confirmed, so the workers of a frozen driver wait before a second launch can take the run over. An endpoint that
ignores conditional writes is found at the start and said: two launches started within the same seconds could
both create the lease, and one of them learns it at its next renewal.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from .config import redact_text
from .errors import ExperimentError
from .rundir import LEASE_FILE, RunDir

TTL_S = float(os.environ.get("TARFLOW_LEASE_TTL_S", 120))
INTERVAL_S = float(os.environ.get("TARFLOW_LEASE_INTERVAL_S", 30))
_probed: dict[tuple, bool] = {}  # (storage, endpoint) -> whether it honours conditional writes


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


def fresh_here(record: dict) -> bool:
    """A holder on this host (one clock for both) whose process runs and whose heartbeat is within its ttl."""
    return driver_alive(record) is True and time.time() - float(record.get("heartbeat", 0)) <= float(
        record.get("ttl", TTL_S))


def holder(record: dict | None) -> str:
    if record is None:
        return "nobody (the lease record is gone)"
    r = record
    return f"{r.get('purpose', '?')}: pid {r.get('pid')} on {r.get('host')}, started {r.get('started')}"


class RunLease:
    """with RunLease(rundir, "orchestrator.run of table2/..."): ... — held for the block, renewed meanwhile.
    clock/sleep: the monotonic time a checker watches a held lease by (tests pass a fake one)."""

    def __init__(self, rundir: RunDir, purpose: str, ttl: float = TTL_S, interval: float = INTERVAL_S,
                 clock=time.monotonic, sleep=time.sleep):
        if ttl < 2 * interval:
            raise ExperimentError(f"the run lease's ttl ({ttl:g} s, TARFLOW_LEASE_TTL_S) must be at least twice its "
                                  f"renewal interval ({interval:g} s, TARFLOW_LEASE_INTERVAL_S)")
        self.rundir, self.storage, self.relpath, self.purpose = rundir, rundir.storage, rundir.lease_path, purpose
        self.ttl, self.interval, self.clock, self.sleep = ttl, interval, clock, sleep
        self.owner = uuid.uuid4().hex
        self.beat = 0
        self.confirmed: float | None = None  # monotonic start of the last renewal that found the lease ours
        self.lost: str | None = None         # who holds the run now, once this launch lost it
        self._watchers: tuple = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def record(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": process_start(os.getpid()), "purpose": self.purpose, "started": self.started,
            "command": redact_text(" ".join(sys.argv))[:500], "heartbeat": time.time(), "beat": self.beat,
            "ttl": self.ttl, "interval": self.interval}).encode()

    def read(self) -> tuple[dict, str] | None:
        current = self.storage.read_versioned(self.relpath)
        return None if current is None else (json.loads(current[0]), current[1])

    # -- taking it -------------------------------------------------------------------------------

    def acquire(self) -> RunLease:
        self.check_endpoint()
        for _ in range(5):  # each pass either wins, refuses, or lost a race to a writer that just changed it
            started = self.clock()
            current = self.read()
            if current is None:
                if self.storage.create_if_absent(self.relpath, self.record()):
                    return self._won(started)
                continue
            held, version = current
            seen, why = self.watch(held, version)
            if seen == "alive":
                raise LeaseHeld(self.describe_holder(held))
            if seen == "gone":
                continue
            started = self.clock()
            if self.storage.replace_if_version(self.relpath, self.record(), version):
                print(f"[orchestrator] took over the stale lease of {self.relpath} ({holder(held)}; {why})", flush=True)
                return self._won(started)
        raise LeaseHeld(f"could not take the lease {self.rundir.describe(LEASE_FILE)}: other "
                        "launches keep changing it; is the same run being started in a loop?")

    def watch(self, held: dict, version: str) -> tuple[str, str]:
        """Whether the holder of a lease is "alive" (its record changed while watched, or it is fresh on this
        host), "stale" (gone from this host, or unchanged for its ttl of our own clock) or "gone" (released),
        and why."""
        if driver_alive(held) is False:
            return "stale", "its process is gone"
        if fresh_here(held):
            return "alive", "it runs on this host"
        ttl, interval = float(held.get("ttl", TTL_S)), float(held.get("interval", INTERVAL_S))
        print(f"[orchestrator] the lease of {self.relpath} is held by {holder(held)}; watching it for up to "
              f"{ttl:.0f} s (a live driver renews it every {interval:.0f} s)", flush=True)
        since = self.clock()
        while self.clock() - since < ttl:
            self.sleep(max(0.05, min(interval / 3, 5.0)))
            current = self.storage.read_versioned(self.relpath)
            if current is None:
                return "gone", "released"
            if current[1] != version:
                return "alive", "renewed"
        return "stale", f"unchanged for {self.clock() - since:.0f} s"

    def _won(self, started: float) -> RunLease:
        """Read back: ours only if the stored record names this launch (an endpoint that ignores conditions
        lets two creates succeed)."""
        current = self.read()
        if not self._ours(current):
            raise LeaseHeld(self.describe_holder(current[0] if current else None))
        self.confirmed = started
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def check_endpoint(self) -> None:
        """Once per storage and process: say plainly when conditional writes are not honoured."""
        key = (type(self.storage), self.storage.uri, self.storage.endpoint_url)
        if key not in _probed:
            _probed[key] = self.storage.honours_conditional_writes(self.rundir.lease_probe_path(self.owner))
        if not _probed[key]:
            print(f"[orchestrator] WARNING: the storage {self.rundir.describe()} ignores conditional writes (S3 "
                  "If-None-Match / If-Match): two launches of one run started within the same seconds could both "
                  f"take its lease; the one that did not keep it stops at its next renewal ({self.interval:.0f} s), "
                  "after both trained into the same checkpoints meanwhile. Start a run once, or use an endpoint "
                  "that honours them (AWS S3, MinIO, SeaweedFS).", flush=True)

    def describe_holder(self, held: dict | None) -> str:
        ttl = float((held or {}).get("ttl", TTL_S))
        return (f"this run is already being driven by another launch ({holder(held)}; its lease "
                f"{self.rundir.describe(LEASE_FILE)} is renewed, so it is alive). Two drivers would "
                "train into the same checkpoints and MLflow run. Wait for it to end or stop it; if its driver died, "
                f"this command resumes the run once the lease has stopped changing for {ttl:.0f} s (at once on the "
                "same host)")

    # -- holding it ------------------------------------------------------------------------------

    def renew(self) -> bool:
        """One renewal, checked before and after the write; False once the lease is lost (the watchers are told)."""
        started = self.clock()
        current = self.read()
        if not self._ours(current):
            return self._lose(current)
        self.beat += 1
        self.storage.replace_if_version(self.relpath, self.record(), current[1])
        current = self.read()
        if not self._ours(current):
            return self._lose(current)
        if current[0].get("beat") == self.beat:
            self.confirmed = started
            self._tell(0)
        return True

    def valid_for(self) -> float:
        """How much longer the workers may trust the lease without a new renewal: no other launch can take it
        over before ttl has passed since it last changed, and a renewal takes up to an interval to be seen."""
        return (self.confirmed or 0.0) + self.ttl - self.interval - self.clock()

    def still_ours(self) -> bool:
        """Read now, not at the next renewal: False once another launch holds the lease. A storage that does not
        answer cannot tell, and what was known stands."""
        if self.lost:
            return False
        try:
            current = self.read()
        except Exception:
            return True
        if self._ours(current):
            return True
        return self._lose(current)

    def _ours(self, current: tuple[dict, str] | None) -> bool:
        """Whether a read of the lease (record, version) names this launch."""
        return current is not None and current[0].get("owner") == self.owner

    def _lose(self, current: tuple[dict, str] | None) -> bool:
        if self.lost:
            return False
        self.lost = holder(current[0] if current else None)
        print(f"[orchestrator] the lease of {self.relpath} was taken over by another launch ({self.lost})",
              flush=True)
        self._tell(1)
        return False

    def _tell(self, which: int) -> None:
        for on_held, on_lost in self._watchers:
            try:
                on_lost(self.lost) if which else on_held(self.valid_for())
            except Exception:  # a watcher that is gone (its board ended) is no reason to stop renewing
                pass

    @contextmanager
    def watched(self, on_held, on_lost):
        """Tell on_held(seconds the lease stays trustworthy) after each renewal, on_lost(the new holder) once."""
        pair = (on_held, on_lost)
        self._watchers = (*self._watchers, pair)
        self._tell(1 if self.lost else 0)
        try:
            yield self
        finally:
            self._watchers = tuple(w for w in self._watchers if w is not pair)

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.renew():
                    return
            except Exception as e:  # storage blips: the workers trust the lease for ttl - interval meanwhile
                print(f"[orchestrator] could not renew the lease {self.relpath} ({type(e).__name__}); retrying",
                      flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.confirmed is not None and not self.lost:
            try:
                current = self.read()
                if self._ours(current):
                    self.storage.delete(self.relpath)
            except Exception:  # an unreleased lease goes stale on its own
                pass
        self.confirmed = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
