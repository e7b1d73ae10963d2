"""What the driver knows of a run while Ray trains it: a small actor that rank 0 tells of its progress and
that Ray Train's controller tells of every checkpoint it persisted; the driver prints one progress line per
log interval from it and, when a run fails, names the last checkpoint that is safe in storage."""

from __future__ import annotations

import threading

import ray
from ray.train import UserCallback


@ray.remote(num_cpus=0)
class RunBoard:
    def __init__(self):
        self.lines: list[dict] = []
        self.checkpoint: str | None = None

    def progress(self, values: dict) -> None:
        self.lines.append(values)

    def persisted(self, path: str) -> None:
        self.checkpoint = path

    def drain(self) -> tuple[list[dict], str | None]:
        lines, self.lines = self.lines, []
        return lines, self.checkpoint


class CheckpointNotifier(UserCallback):
    """Runs in Ray Train's controller: tells the board of each checkpoint once it is in storage."""

    def __init__(self, board):
        self.board = board

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None:
            self.board.persisted.remote(checkpoint.path)


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
    """Polls the board in a thread while the driver waits in fit(); prints each progress line once."""

    def __init__(self, board, name: str, every: float = 1.0):
        self.board, self.name, self.every = board, name, every
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
        for p in lines:
            line = evaluation_line(self.name, p) if p.get("kind") == "evaluation" else progress_line(self.name, p)
            print(line, flush=True)
