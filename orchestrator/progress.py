"""What the driver knows of a run while Ray trains it, and what the workers learn from it: a small actor that
rank 0 tells of its progress and of each start of the workers (the run's attempts), that Ray Train's controller
tells of every checkpoint it persisted, and that the driver tells of the run's lease (lease.py). The driver prints
one progress line per log interval from it and, when a run fails, names the last checkpoint that is safe in
storage; rank 0 asks it, before anything it writes, whether the lease is still this launch's."""

from __future__ import annotations

import collections
import logging
import threading
import time

import ray
from ray.train import UserCallback
from ray.tune import Callback

from .delivery import say


@ray.remote(num_cpus=0)
class RunBoard:
    def __init__(self, attempts: list[dict] | None = None):
        self.lines: collections.deque = collections.deque(maxlen=1000)  # undrained when nobody prints (sweeps)
        self.checkpoint: str | None = None
        self.step: int | None = None
        self.attempts: list[dict] = list(attempts or [])
        self.lease_until: float | None = None  # this actor's monotonic time; None: no lease is watched
        self.lost_to: str | None = None

    def progress(self, values: dict) -> None:
        self.lines.append(values)
        self.step = values.get("step", self.step)

    def persisted(self, path: str) -> None:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if self.checkpoint is None or name > self.checkpoint.rstrip("/").rsplit("/", 1)[-1]:
            self.checkpoint = path

    def drain(self) -> tuple[list[dict], str | None]:
        lines = list(self.lines)
        self.lines.clear()
        return lines, self.checkpoint

    def attempt(self, step: int, workers: int) -> list[dict]:
        """The workers (re)started at `step`: every attempt of the run so far, this one last (the one before
        ends at the last step it reported)."""
        if self.attempts and "to" not in self.attempts[-1] and self.step is not None:
            self.attempts[-1]["to"] = self.step
        self.attempts.append({"from": step, "workers": workers})
        self.step = step
        return self.attempts

    def attempt_ended(self, step: int) -> list[dict]:
        if self.attempts:
            self.attempts[-1]["to"] = step
        return self.attempts

    def lease_held(self, valid_for: float) -> None:
        self.lease_until = time.monotonic() + valid_for

    def lease_lost(self, holder: str) -> None:
        self.lost_to = holder

    def lease(self) -> tuple[str, float | str | None]:
        """("held", None), ("unconfirmed", seconds past the time it could be trusted) or ("lost", the launch
        that holds it now)."""
        if self.lost_to is not None:
            return "lost", self.lost_to
        left = None if self.lease_until is None else self.lease_until - time.monotonic()
        return ("held", None) if left is None or left > 0 else ("unconfirmed", -left)


def lease_lost(board) -> str | None:
    """Rank 0, before it writes: None while the run's lease is this launch's, the launch that holds it now once
    it is lost. While the driver has not confirmed it for longer than it may be trusted (the driver is frozen, or
    cut off from the storage), this waits: a second launch may take the run over only after that."""
    waiting_since = None
    while True:
        try:
            state, detail = ray.get(board.lease.remote(), timeout=60)
        except Exception:  # no board: the driver is gone, and Ray ends these workers with it
            return None
        if state == "lost":
            return detail
        if state == "held":
            if waiting_since is not None:
                say(f"[run] the driver renewed the run's lease again after {time.monotonic() - waiting_since:.0f} s; "
                    "training goes on")
            return None
        if waiting_since is None:
            waiting_since = time.monotonic()
            say("[run] the driver has not renewed the run's lease in time (it is frozen, or cut off from the "
                "storage): training waits until it does, and stops if another launch takes the run over")
        time.sleep(0.5)


class CheckpointNotifier(UserCallback):
    """Runs in Ray Train's controller: tells the board of each checkpoint once it is in storage."""

    def __init__(self, board):
        self.board = board

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None:
            self.board.persisted.remote(checkpoint.path)


def quiet_ray_train_logs() -> None:
    """In a Train worker: Ray Train's INFO lines off, its warnings and errors on. RunConfig.logging_config
    covers the `ray.train` loggers; a few of Ray Train's modules log under their file path instead (the
    "Reporting training result N" line of every report), so those are quieted by name here."""
    for name in list(logging.Logger.manager.loggerDict):
        if "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(name: str, p: dict) -> str:
    """[name] step 120/400 (30%)  epoch 1.88  loss 2.3451  1,234 img/s  elapsed 0:01:23  eta 0:03:14"""
    step, total = p["step"], p["total"]
    done = (step - p.get("start_step", 0)) / max(1, total - p.get("start_step", 0))
    eta = p["elapsed"] / done * (1 - done) if done > 0 else float("nan")
    return (f"[{name}] step {step}/{total} ({step / total:.0%})  epoch {p['epoch']:.2f}  loss {p['loss']:.4f}  "
            f"{p['images_per_sec']:,.0f} img/s  elapsed {clock(p['elapsed'])}  "
            f"eta {clock(eta) if eta == eta else '?'}")


def evaluation_line(name: str, p: dict) -> str:
    """[name] step 1000 evaluation: bpd 3.4567  fid 41.20  (12 s; evaluation 1.3% of the time so far)"""
    shown = "  ".join(f"{k.split('/', 1)[1]} {p[k]:.4f}" for k in ("periodic/bpd", "periodic/fid") if k in p)
    return (f"[{name}] step {p['step']} evaluation: {shown or 'sample grid'}  ({p['periodic/seconds']:.1f} s; "
            f"evaluation {p['periodic/share']:.1%} of the time so far)")


class ProgressPrinter:
    """Polls the board in a thread while the driver waits in fit(); prints each progress line once (show)."""

    def __init__(self, board, name: str, every: float = 1.0, show: bool = True):
        self.board, self.name, self.every, self.show = board, name, every, show
        self.last_checkpoint: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._poll()

    def _poll(self) -> None:
        try:
            lines, self.last_checkpoint = ray.get(self.board.drain.remote(), timeout=10)
        except Exception:  # the board is only for display; never fail the run over it
            return
        for p in lines if self.show else []:
            line = evaluation_line(self.name, p) if p.get("kind") == "evaluation" else progress_line(self.name, p)
            print(line, flush=True)


SHOWN = ("step", "loss", "bpd", "fid")  # what a trial's line shows of its reports, when there


class TrialEvents(Callback):
    """Runs in the sweep's driver: one line per trial event (started, reported, stopped early, finished,
    errored), instead of Tune's periodic status tables. Tune still prints a failed trial's error in full."""

    def __init__(self, sweep_name: str):
        self.sweep_name = sweep_name
        self.stopped: set[str] = set()

    def say(self, trial, what: str) -> None:
        overrides = (trial.config or {}).get("overrides") or {}
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "the run"
        print(f"[sweep] trial {trial.trial_id} ({label}) {what}", flush=True)

    @staticmethod
    def figures(result: dict | None) -> str:
        result = result or {}
        return "  ".join(f"{k} {result[k]:.4g}" if isinstance(result[k], float) else f"{k} {result[k]}"
                         for k in SHOWN if k in result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):  # the controller marks the result that made the scheduler stop the trial
            self.stopped.add(trial.trial_id)
        self.say(trial, f"reported {self.figures(result)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.stopped:
            self.say(trial, f"stopped early by the scheduler after {self.figures(trial.last_result)}")
        else:
            self.say(trial, f"finished: {self.figures(trial.last_result)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = str(trial.get_error() or "").strip().splitlines()
        self.say(trial, f"errored: {error[-1] if error else 'see the error above'}")
