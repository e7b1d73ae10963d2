"""A run's directory in storage: every name in it, and what is done with them. Nothing else spells a path.

    <storage root>/
      <run>/                              a training run (or a sweep's Tune state, a sample job: same names)
        config.yaml                       the resolved config, credentials redacted
        lease.json                        the driver that holds the run (lease.py)
        checkpoint_<step>/                state.pt, state.pt.sha256, tracking_backlog.json (undelivered then)
        checkpoint_manager_snapshot.json  Ray Train's own record of the checkpoints it reported
        corrupt/                          checkpoints set aside (corrupt, or cut short), kept for a post-mortem
        final_metrics.json                written by rank 0 at the end of the workers' job
        evaluated-<MLflow run id>.json    the metrics of one re-evaluation of a finished run
        tracking_backlog.json             tracking records MLflow has not received yet (Backlog)
        result.json                       the result marker: the run is finished (and how it was evaluated)
        samples/<settings key>/           a sample job: samples.npz, grid.png, parts/ while drawing
      fid_stats/<key>                     FID reference statistics, computed once per data set and transform
      tables/<experiment>/                the paper's table: table.md, table.csv, table.tex, figure.png

Storage is the record of truth; MLflow follows, and what it missed waits in the backlog.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tarflow.training import CHECKSUM_SUFFIX, CheckpointCorrupt

from .config import redact_uri
from .errors import RESUME_FAILED, ExperimentError, RunFailed
from .storage import RunStorage

CHECKPOINT_FILE = "state.pt"
BACKLOG_FILE = "tracking_backlog.json"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
LEASE_FILE = "lease.json"
FINAL_FILE = "final_metrics.json"
EVALUATED_FILE = "evaluated-{run_id}.json"
SAMPLES_FILE = "samples.npz"  # arr_0: uint8 (N, H, W, C), arr_1: int64 labels of a conditional model (ADM's layout)
GRID_FILE = "grid.png"
SAMPLES_DIR = "samples"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
SET_ASIDE_DIR = "corrupt"
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")
FID_STATS_DIR = "fid_stats"
TABLES_DIR = "tables"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def checkpoint_step(name: str | None) -> int:
    """The step of a checkpoint directory (its name or a path ending in it); -1 for none."""
    m = CHECKPOINT_DIR.fullmatch(str(name or "").rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def run_dir_name(experiment: str, arch: str, run_key: str) -> str:
    """<experiment>-<P-Ch-T-K>-<config hash>: unique per trained model, safe in any storage."""
    return f"{storage_safe(experiment)}-{arch}-{run_key}"


def sweep_dir_name(experiment: str, sweep_key: str) -> str:
    """A sweep's directory: Ray Tune's state of it, and its lease."""
    return f"{storage_safe(experiment)}-sweep-{sweep_key}"


def reference_samples(storage: RunStorage, checkpoint_stem: str, key: str) -> RunDir:
    """The sample job of a checkpoint file that is not one of our runs' (orchestrator.sample
    --reference-checkpoint)."""
    return RunDir(storage, f"{SAMPLES_DIR}/{storage_safe(checkpoint_stem)}-{key}")


def runs_of(storage: RunStorage, experiment: str) -> list[RunDir]:
    """The run directories an experiment (experiment.name, its trials included) has in storage."""
    own = re.compile(re.escape(storage_safe(experiment)) + r"-\d+-\d+-\d+-\d+-[0-9a-f]{10}")
    return [RunDir(storage, name) for name in storage.listdir("") if own.fullmatch(name)]


def storage_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)


def fid_stats_path(key: str) -> str:
    return f"{FID_STATS_DIR}/{key}"


def table_path(experiment: str, file: str) -> str:
    return f"{TABLES_DIR}/{experiment}/{file}"


@dataclass
class RunDir:
    storage: RunStorage
    name: str                   # relative to the storage root; a sample job's is <run>/samples/<key>

    def path(self, *parts: str) -> str:
        return "/".join([self.name, *parts])

    def describe(self, *parts: str) -> str:
        """Where a file is, for messages (credentials redacted)."""
        return f"{redact_uri(self.storage.describe())}/{self.path(*parts)}"

    def samples(self, key: str) -> RunDir:
        return RunDir(self.storage, self.path(SAMPLES_DIR, key))

    def sample_jobs(self) -> list[RunDir]:
        return [self.samples(key) for key in self.storage.listdir(self.path(SAMPLES_DIR))]

    @property
    def lease_path(self) -> str:
        return self.path(LEASE_FILE)

    def lease_probe_path(self, owner: str) -> str:
        """A scratch record beside the lease, to learn whether the storage honours conditional writes."""
        return self.path(f"{LEASE_FILE}.probe-{owner}")

    @property
    def backlog(self) -> Backlog:
        return Backlog(self)

    # -- records -------------------------------------------------------------------------------

    def read_result(self) -> dict | None:
        return self.storage.read_json(self.path(RESULT_FILE))

    def write_result(self, result: dict) -> None:
        self.storage.write_text(self.path(RESULT_FILE), json.dumps(result, indent=1))

    def write_config(self, text: str) -> None:
        self.storage.write_text(self.path(CONFIG_FILE), text)

    def read_config(self) -> str | None:
        return self.storage.read_text(self.path(CONFIG_FILE))

    def read_final(self) -> dict | None:
        return self.storage.read_json(self.path(FINAL_FILE))

    def write_final(self, final: dict) -> None:
        self.storage.write_text(self.path(FINAL_FILE), json.dumps(final))

    def read_evaluation(self, run_id: str) -> dict | None:
        return self.storage.read_json(self.path(EVALUATED_FILE.format(run_id=run_id)))

    def write_evaluation(self, run_id: str, metrics: dict) -> None:
        self.storage.write_text(self.path(EVALUATED_FILE.format(run_id=run_id)), json.dumps(metrics))

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoints(self) -> list[str]:
        """checkpoint_<step> directories, oldest first."""
        return sorted(n for n in self.storage.listdir(self.name) if CHECKPOINT_DIR.fullmatch(n))

    def latest_checkpoint(self) -> str | None:
        names = self.checkpoints()
        return names[-1] if names else None

    def checkpoint_file(self, checkpoint: str, file: str = CHECKPOINT_FILE) -> str:
        return self.path(checkpoint, file)

    def checkpoint_records(self, checkpoint: str) -> list[dict]:
        """The tracking records rank 0 had queued and not yet delivered when it wrote the checkpoint."""
        return self.storage.read_json(self.checkpoint_file(checkpoint, BACKLOG_FILE)) or []

    def download_checkpoint(self, checkpoint: str, local: Path) -> Path:
        """A checkpoint's files (state, its checksum record, its backlog) into a local directory."""
        for file in (CHECKPOINT_FILE, CHECKPOINT_FILE + CHECKSUM_SUFFIX, BACKLOG_FILE):
            if self.storage.exists(self.checkpoint_file(checkpoint, file)):
                self.storage.download(self.checkpoint_file(checkpoint, file), Path(local) / file)
        return Path(local)

    def checkpoint_to_resume(self, set_aside_corrupt: bool) -> str | None:
        """The latest checkpoint, checked against its checksum before any cluster work.

        One cut short (no checksum record: its upload did not finish) is set aside and the one before it used.
        A corrupt one stops the launch (it would fail the same way on every retry) with what to do; with
        set_aside_corrupt it is set aside too. A read that fails is an I/O problem of the storage."""
        names = self.checkpoints()
        while names:
            name = names[-1]
            try:
                if self.storage.verify_file(self.checkpoint_file(name)):
                    return name
                print(f"[orchestrator] checkpoint {name} of {self.name} is incomplete (no checksum record: its "
                      "upload was cut short); resuming from the one before it", flush=True)
                self.set_aside(name, "incomplete")
            except CheckpointCorrupt as e:
                if not set_aside_corrupt:
                    raise ExperimentError(self._corrupt_message(name, names, e)) from None
                self.set_aside(name, "corrupt")
            except OSError as e:
                raise RunFailed(f"could not read checkpoint {name} of run {self.name} from "
                                f"{redact_uri(self.storage.describe())} to check it ({e}); this is an I/O problem "
                                "of the storage, not of the checkpoint: rerun when the storage answers") from None
            names.pop()
        return None

    def _corrupt_message(self, name: str, names: list[str], e: Exception) -> str:
        previous = names[-2] if len(names) > 1 else None
        return (f"{RESUME_FAILED} {name} of run {self.name}: {e}. It would fail the same way on every retry, so "
                "nothing was started, and nothing was deleted. To resume from "
                + (f"the checkpoint before it ({previous})" if previous else "scratch (it is the only one)")
                + ", rerun the same command with --set-aside-corrupt-checkpoint: the bad one is kept in "
                f"{self.path(SET_ASIDE_DIR)}/")

    def set_aside(self, checkpoint: str, why: str) -> None:
        """Move a checkpoint into corrupt/, with Ray Train's record (which names it), so the next launch
        starts from the previous checkpoint (the driver passes it explicitly)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = self.path(SET_ASIDE_DIR, f"{checkpoint}-{stamp}")
        self.storage.move_dir(self.path(checkpoint), kept)
        if self.storage.exists(self.path(RAY_SNAPSHOT)):
            self.storage.move_file(self.path(RAY_SNAPSHOT), self.path(SET_ASIDE_DIR, f"{RAY_SNAPSHOT}-{stamp}"))
        print(f"[orchestrator] set aside {why} checkpoint {checkpoint} of {self.name} in {kept}", flush=True)

    # -- sample jobs -----------------------------------------------------------------------------

    def sample_part(self, chunk: int) -> str:
        return self.path("parts", f"chunk-{chunk:07d}.npz")

    def write_grid(self, png: bytes) -> None:
        self.storage.write_bytes(self.path(GRID_FILE), png)

    def read_grid(self) -> bytes | None:
        return self.storage.read_bytes(self.path(GRID_FILE))

    def delete_parts(self) -> None:
        self.storage.delete_dir(self.path("parts"))


class Backlog:
    """Tracking records MLflow has not received yet, kept in a run directory until a command delivers them.

    Every producer of tracking records uses these verbs: `merge` adds records after those already kept (exact
    repeats dropped: metric steps, images and statuses are idempotent to deliver anyway), `replay` delivers them
    in order and empties the backlog, `deliver_or_keep` delivers the backlog and new records now or keeps them
    all for later. The rank-0 queue's undelivered records travel inside each checkpoint under the same name."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self.relpath = rundir.path(BACKLOG_FILE)

    def read(self) -> list[dict]:
        return self.rundir.storage.read_json(self.relpath) or []

    def exists(self) -> bool:
        return self.rundir.storage.exists(self.relpath)

    def merge(self, records: list[dict]) -> None:
        if not records:
            return
        kept = self.read()
        seen = {record_identity(r) for r in kept}
        kept += [r for r in records if record_identity(r) not in seen]
        self.rundir.storage.write_text(self.relpath, json.dumps(kept))

    def replay(self, tracker) -> bool:
        """Deliver what is kept; False (and kept) while MLflow does not take it."""
        records = self.read()
        if not records:
            return True
        try:
            tracker.deliver(records)
        except Exception as e:  # still unreachable: the backlog stays for the next command
            print(f"[orchestrator] MLflow is still behind on {self.rundir.name} ({type(e).__name__}); "
                  f"{len(records)} record(s) stay in {BACKLOG_FILE}", flush=True)
            return False
        self.rundir.storage.delete(self.relpath)
        print(f"[orchestrator] MLflow caught up on {self.rundir.name}: {len(records)} record(s) replayed", flush=True)
        return True

    def deliver_or_keep(self, tracker, records: list[dict]) -> bool:
        """The backlog, then records, delivered now; all kept in order when MLflow does not answer. Returns
        whether MLflow is up to date."""
        try:
            kept = self.read()
        except OSError:  # the storage itself is gone (a failed run may be why): MLflow gets what it can now
            kept = None
        try:
            tracker.deliver([*(kept or []), *records])
        except Exception:  # an outage: everything waits in storage, in order
            if kept is None:
                print(f"[orchestrator] neither MLflow nor the storage answers: {len(records)} tracking record(s) "
                      f"of {self.rundir.name} are lost", flush=True)
                return False
            self.merge(records)
            return False
        if kept:
            self.rundir.storage.delete(self.relpath)
        return True

    def behind_message(self, tracking_uri: str) -> str:
        return (f"[orchestrator] the result of {self.rundir.name} is in {self.rundir.describe()}, but MLflow at "
                f"{redact_uri(tracking_uri)} is behind: what it missed is kept in {self.relpath}. It catches up by "
                "itself at the next `python -m orchestrator.run` of this experiment, or now with "
                "`python -m orchestrator.report <experiment.yaml>` once the server answers.")


def record_identity(rec: dict) -> str:
    """What makes two tracking records the same: a metric step or an image step is delivered once whenever it was
    logged (its timestamp aside); anything else by its whole content."""
    if rec["kind"] == "metrics":
        return json.dumps(["metrics", rec["run_id"], rec["step"], sorted(rec["values"])])
    if rec["kind"] == "image":
        return json.dumps(["image", rec["run_id"], rec["key"], rec["step"]])
    return json.dumps(rec, sort_keys=True)


def write_records(path: Path, records: list[dict]) -> None:
    """Undelivered records into a local checkpoint directory, before it is uploaded."""
    Path(path, BACKLOG_FILE).write_text(json.dumps(records))


def read_records(path: Path) -> list[dict]:
    file = Path(path, BACKLOG_FILE)
    return json.loads(file.read_text()) if file.is_file() else []
