"""The run lease: judged by watching the record change on the checker's own clock (never by comparing two hosts'
clocks), read back after every write, lost when another launch holds it, and free of credentials. (A frozen driver
taken over for real, end to end, is in test_faults.py.)"""

import json
import sys
import threading
import time

import pytest

from orchestrator.lease import LeaseHeld, RunLease
from orchestrator.rundir import RunDir
from orchestrator.storage import RunStorage


class FakeClock:
    """A monotonic clock that sleeping moves on: a checker watches a lease for its ttl in no time."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def elsewhere(beat: int, clock_offset: float, ttl: float, interval: float) -> bytes:
    """The lease record of a driver on another host, whose wall clock is clock_offset seconds off ours."""
    return json.dumps({"owner": "owner-elsewhere", "host": "elsewhere", "pid": 4242, "pid_start": "1",
                       "purpose": "orchestrator.run on another host", "started": "2030-01-01T00:00:00+00:00",
                       "heartbeat": time.time() + clock_offset, "beat": beat, "ttl": ttl,
                       "interval": interval}).encode()


def hold_elsewhere(run: RunDir, stop: threading.Event, clock_offset: float, ttl: float, interval: float) -> None:
    """A live driver on another host: it renews its lease every interval."""
    beat = 0
    while not stop.is_set():
        current = run.storage.read_versioned(run.lease_path)
        data = elsewhere(beat, clock_offset, ttl, interval)
        if current is None:
            run.storage.create_if_absent(run.lease_path, data)
        else:
            run.storage.replace_if_version(run.lease_path, data, current[1])
        beat += 1
        stop.wait(interval)


def owner_of(run: RunDir) -> str:
    return json.loads(run.storage.read_versioned(run.lease_path)[0])["owner"]


@pytest.fixture
def run(tmp_path) -> RunDir:
    return RunDir(RunStorage(str(tmp_path / "store")), "table2-run")


def test_a_live_driver_on_a_host_whose_clock_is_behind_keeps_its_run(run):
    """Its heartbeat reads an hour old by our clock, but it changes: it is alive. (Judged by comparing clocks,
    a second launch took over a live run.)"""
    stop = threading.Event()
    thread = threading.Thread(target=hold_elsewhere, args=(run, stop, -3600, 1.0, 0.1), daemon=True)
    thread.start()
    try:
        while run.storage.read_versioned(run.lease_path) is None:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match="already being driven by another launch .orchestrator.run on another "
                                             "host: pid 4242 on elsewhere"):
            RunLease(run, "second launch").acquire()
        assert time.monotonic() - started < 1.0  # refused at its first renewal seen, not after the ttl
        assert owner_of(run) == "owner-elsewhere"
    finally:
        stop.set()
        thread.join()


def test_a_dead_driver_on_a_host_whose_clock_is_ahead_is_taken_over_after_the_ttl_of_our_own_clock(run, capsys):
    """Its heartbeat reads an hour in the future by our clock, and never changes: after its ttl of watching, on our
    own monotonic clock, the run is ours. (Judged by comparing clocks, it blocked the run for an hour.)"""
    run.storage.create_if_absent(run.lease_path, elsewhere(7, +3600, ttl=30, interval=10))
    clock = FakeClock()
    lease = RunLease(run, "second launch", clock=clock, sleep=clock.sleep)
    with lease:
        assert 30 <= clock.now - 1000 < 35  # watched for the holder's ttl, no longer
        assert owner_of(run) == lease.owner
        assert lease.valid_for() == pytest.approx(lease.ttl - lease.interval - (clock.now - lease.confirmed))
    out = capsys.readouterr().out
    assert "watching it for up to 30 s" in out and "took over the stale lease" in out and "unchanged for 3" in out
    assert run.storage.read_versioned(run.lease_path) is None  # released


def test_a_driver_whose_lease_another_launch_took_learns_it_at_its_next_renewal_and_says_to_whom(run):
    told = {"held": [], "lost": []}
    lease = RunLease(run, "first launch", ttl=60, interval=10)
    with lease, lease.watched(told["held"].append, told["lost"].append):
        assert told["held"] and 49 < told["held"][0] <= 50  # trusted for ttl - interval after the renewal
        assert lease.renew() and len(told["held"]) == 2
        # another launch takes the run over (it watched the record stand still for the ttl)
        current = run.storage.read_versioned(run.lease_path)
        assert run.storage.replace_if_version(run.lease_path, elsewhere(0, 0, 60, 10), current[1])
        assert not lease.renew()
        assert told["lost"] == ["orchestrator.run on another host: pid 4242 on elsewhere, started "
                                "2030-01-01T00:00:00+00:00"]
        assert lease.lost == told["lost"][0] and len(told["held"]) == 2
    assert owner_of(run) == "owner-elsewhere"  # the lost lease is neither overwritten nor released


class IgnoresConditions(RunStorage):
    """An S3-compatible endpoint that ignores If-None-Match / If-Match: every conditional write succeeds."""

    def _conditional_put(self, relpath, data, version):
        self.write_bytes(relpath, data)
        return True


class RacedRead(IgnoresConditions):
    """The same endpoint, read by a launch an instant before another one created the lease."""

    raced = False

    def read_versioned(self, relpath):
        if not self.raced and relpath.endswith("lease.json"):
            self.raced = True
            return None
        return super().read_versioned(relpath)


def test_an_endpoint_that_ignores_conditional_writes_is_said_and_only_one_of_two_winners_keeps_the_run(tmp_path,
                                                                                                        capsys):
    first = RunDir(IgnoresConditions(str(tmp_path / "store")), "run")
    second = RunDir(RacedRead(str(tmp_path / "store")), "run")
    a = RunLease(first, "first launch", ttl=60, interval=10).acquire()
    b = RunLease(second, "second launch", ttl=60, interval=10).acquire()  # both creates "succeed"
    try:
        out = capsys.readouterr().out
        assert "WARNING: the storage" in out and "ignores conditional writes" in out
        assert owner_of(first) == b.owner  # the record read back after b's create is b's
        assert not a.renew() and a.lost.startswith("second launch: pid")  # a learns it at its next renewal
        assert b.renew() and b.renew() and owner_of(first) == b.owner  # and leaves the run to b
    finally:
        a.release()
        b.release()
    assert first.storage.read_versioned(first.lease_path) is None


def test_the_lease_record_holds_no_credential_of_the_command_line(run, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["orchestrator/run.py", "experiments/table2.yaml",
                                      "tracking.uri=https://alice:s3cret@mlflow.example.com",
                                      "storage.endpoint_url=https://minio.example.com/?X-Amz-Security-Token=t0ken"])
    with RunLease(run, "a launch"):
        stored = run.storage.read_versioned(run.lease_path)[0].decode()
    assert "s3cret" not in stored and "t0ken" not in stored, stored
    assert "tracking.uri=https://alice:***@mlflow.example.com" in json.loads(stored)["command"]
