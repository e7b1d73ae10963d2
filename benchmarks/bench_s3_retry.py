"""How long pyarrow's S3 client keeps retrying when the endpoint is gone, and whether it bridges an outage:
the numbers behind storage.retry_seconds (orchestrator/storage.py). Prints figures; asserts nothing.

    python benchmarks/bench_s3_retry.py [--attempts 3,6,10,14] [--outage-s 30] [--repeats 2]

1. Gone for good: a SeaweedFS server is stopped, then one small write is timed until it fails, for each
   strategy (AWS Standard, AWS Default) and max_attempts: the back-off the AWS SDK applies to a refused
   connection.
2. An outage: the server is stopped for --outage-s seconds and started again on the same ports; a write of
   a checkpoint-like directory (pyarrow.fs.copy_files, what Ray Train uploads with) is started while it is
   down, through storage.py's filesystem for storage.retry_seconds = 2 × the outage: did it succeed, when.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "local"))
sys.path.insert(0, str(ROOT))

import pyarrow.fs as pafs  # noqa: E402
from devservers import create_bucket, start_s3_server  # noqa: E402

KEY, SECRET = "benchkey", "benchsecret"


def timed_write(fs: pafs.FileSystem, path: str, data: bytes = b"x" * 1024) -> tuple[float, str]:
    started = time.monotonic()
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return time.monotonic() - started, "ok"
    except OSError as e:
        return time.monotonic() - started, " ".join(str(e).split())[:120]


def gone_for_good(s3, attempts: list[int], repeats: int) -> None:
    endpoint = s3.url.split("://", 1)[1]
    s3.stop()
    print("1. endpoint gone for good (connection refused): seconds until a write fails")
    for name, strategy in (("standard", pafs.AwsStandardS3RetryStrategy), ("default", pafs.AwsDefaultS3RetryStrategy)):
        for n in attempts:
            times = []
            for r in range(repeats):
                fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key=KEY, secret_key=SECRET,
                                       retry_strategy=strategy(max_attempts=n), connect_timeout=1)
                seconds, outcome = timed_write(fs, f"bench/gone-{name}-{n}-{r}")
                times.append(seconds)
            print(f"   {name:8s} max_attempts={n:3d}: {', '.join(f'{t:6.1f}' for t in times)} s   ({outcome})",
                  flush=True)


def outage(workdir: Path, outage_s: float) -> None:
    from orchestrator.storage import RunStorage

    s3 = start_s3_server(workdir / "s3", kind="seaweedfs", access_key=KEY, secret_key=SECRET)
    create_bucket(s3.url, "bench", KEY, SECRET)
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    storage = RunStorage("s3://bench/outage", endpoint_url=s3.url, retry_seconds=2 * outage_s)
    fs, root = storage.filesystem_and_root()
    local = Path(tempfile.mkdtemp())
    (local / "state.pt").write_bytes(os.urandom(8 << 20))  # multipart-sized, as a checkpoint is
    (local / "state.pt.sha256").write_text("x")
    done: dict = {}

    def upload():
        started = time.monotonic()
        try:
            pafs.copy_files(str(local), f"{root}/checkpoint", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            done["outcome"] = "ok"
        except OSError as e:
            done["outcome"] = " ".join(str(e).split())[:160]
        done["seconds"] = time.monotonic() - started

    ports = s3.info["ports"]
    s3.stop()
    stopped = time.monotonic()
    thread = threading.Thread(target=upload)
    thread.start()
    time.sleep(max(0.0, outage_s - (time.monotonic() - stopped)))
    s3 = start_s3_server(workdir / "s3", kind="seaweedfs", access_key=KEY, secret_key=SECRET, ports=ports)
    back = time.monotonic() - stopped
    thread.join()
    s3.stop()
    print(f"2. outage of {back:.1f} s (server back on the same ports), storage.retry_seconds={2 * outage_s:g}: "
          f"upload {done['outcome']} after {done['seconds']:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attempts", default="3,6,10,14")
    p.add_argument("--outage-s", type=float, default=30)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        s3 = start_s3_server(Path(d) / "gone", kind="seaweedfs", access_key=KEY, secret_key=SECRET)
        gone_for_good(s3, [int(a) for a in args.attempts.split(",")], args.repeats)
        outage(Path(d), args.outage_s)


if __name__ == "__main__":
    main()
