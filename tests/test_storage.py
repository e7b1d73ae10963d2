"""Storage that is never half right: records written whole or not at all, and S3 retries that reach the Ray
workers that upload the checkpoints."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from orchestrator.storage import RetryingS3FileSystem, RunStorage, s3_attempts

ROOT = Path(__file__).resolve().parents[1]


def test_a_record_cut_short_by_a_failed_write_leaves_the_one_before(tmp_path):
    """A local record (result.json, the backlog) written in place was truncated by a crash or a full disk, and every
    later launch failed reading it. Here another process writes a new result.json under a file-size limit (a full
    disk, as the kernel sees it), which stops the write part way."""
    storage = RunStorage(str(tmp_path))
    storage.write_text("run/result.json", json.dumps({"step": 100}))
    script = (
        "import json, resource\n"
        "from orchestrator.storage import RunStorage\n"
        f"storage = RunStorage({str(tmp_path)!r})\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "storage.write_text('run/result.json', json.dumps({'step': 200, 'metrics': 'x' * 100_000}))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    assert json.loads(storage.read_text("run/result.json")) == {"step": 100}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["result.json"]  # no temporary file left

    storage.write_text("run/result.json", json.dumps({"step": 200}))  # and a write that completes replaces it
    assert json.loads(storage.read_text("run/result.json")) == {"step": 200}


def test_the_s3_retry_time_reaches_the_processes_ray_ships_the_filesystem_to():
    """pyarrow's pickling of an S3FileSystem drops its retry strategy (apache/arrow#47348): Ray Train's workers
    would upload with the default 3 attempts (about 2 s) whatever storage.retry_seconds says."""
    storage = RunStorage("s3://bucket/runs", endpoint_url="http://127.0.0.1:9", retry_seconds=42)
    fs, root = storage.filesystem_and_root()
    shipped = pickle.loads(pickle.dumps(fs))
    assert isinstance(shipped, RetryingS3FileSystem) and shipped.retry_seconds == 42 and root == "bucket/runs"
    assert shipped.kwargs == {"endpoint_override": "127.0.0.1:9", "scheme": "http"}
    # the AWS SDK's standard back-off (a random 0..2^k s before retry k, at most 20 s; measured by
    # benchmarks/bench_s3_retry.py): 5 retries wait 15.5 s on average, and each one after adds up to 20 s
    assert [s3_attempts(s) for s in (0, 1, 15, 30, 180)] == [1, 3, 6, 8, 15]
