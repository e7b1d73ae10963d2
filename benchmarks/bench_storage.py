"""What one checkpoint costs to write: tarflow.save_checkpoint to the local disk (rank 0 always waits for it:
the file Ray Train then uploads), and the upload as Ray Train does it (pyarrow.fs.copy_files into the
filesystem orchestrator.storage.RunStorage.filesystem_and_root gives, 64 MiB chunks, one thread for S3) to an
S3 server and to a local storage directory. The figures are the defaults of storage.local_write_mb_per_s and
storage.write_mb_per_s (orchestrator/cost.py). Prints MB/s (10^6 bytes per second); asserts nothing.

    python benchmarks/bench_storage.py                        # SeaweedFS on 127.0.0.1, started like the tests'
    python benchmarks/bench_storage.py --arch 2-768-8-8       # the paper's table2 checkpoint (about 5.5 GB)
    python benchmarks/bench_storage.py --uri s3://bucket/prefix --endpoint https://...   # a real bucket

The checkpoint is a real one: a TarFlow's TrainState after one AdamW step (zero gradients, so it costs no
forward pass), whose size is set beside tarflow.checkpoint_bytes's prediction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "infra" / "local"))

import pyarrow.fs as pafs  # noqa: E402

import tarflow  # noqa: E402
from orchestrator.storage import RunStorage  # noqa: E402

MB = 1e6
RAY_CHUNK = 64 * 1024 * 1024  # Ray Train's chunk size for checkpoint copies


def checkpointed_state(arch: str, image_size: int, ema: bool) -> tarflow.TrainState:
    config = tarflow.TarFlowConfig.from_string(arch, image_size=image_size, in_channels=3, num_classes=0)
    state = tarflow.make_train_state(tarflow.TarFlow(config), tarflow.TrainConfig(ema_decay=0.999 if ema else None))
    for p in state.model.parameters():  # AdamW creates its moments at its first step
        p.grad = torch.zeros_like(p)
    state.optimizer.step()
    return state


def timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def upload_rates(local: Path, storage: RunStorage, repeats: int) -> list[float]:
    fs, root = storage.filesystem_and_root()
    threads = not isinstance(fs, pafs.S3FileSystem)  # as Ray Train: no threads for S3 uploads

    def upload(i):
        fs.create_dir(f"{root}/bench_storage/{i}", recursive=True)
        pafs.copy_files(str(local), f"{root}/bench_storage/{i}/state.pt", destination_filesystem=fs,
                        use_threads=threads, chunk_size=RAY_CHUNK)

    seconds = timed(upload, repeats)
    try:
        fs.delete_dir(f"{root}/bench_storage")
    except OSError:
        pass
    return seconds


def report(label: str, size: int, seconds: list[float]) -> float:
    rates = [size / s / MB for s in seconds]
    median = statistics.median(rates)
    print(f"  {label:44s} {median:8.0f} MB/s median  (runs: {', '.join(f'{r:.0f}' for r in rates)}; "
          f"{statistics.median(seconds):.2f} s per checkpoint)")
    return median


def start_seaweedfs(work: Path):
    from devservers import create_bucket, start_s3_server

    svc = start_s3_server(work / "s3", kind="seaweedfs", access_key="benchkey", secret_key="benchsecret")
    os.environ.update(AWS_ACCESS_KEY_ID="benchkey", AWS_SECRET_ACCESS_KEY="benchsecret", AWS_DEFAULT_REGION="us-east-1")
    create_bucket(svc.url, "bench", "benchkey", "benchsecret")
    return svc, RunStorage("s3://bench/runs", endpoint_url=svc.url)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="2-768-4-4", help="P-Ch-T-K of the model whose checkpoint is written")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--ema", action="store_true", help="an EMA copy in the checkpoint (train.ema_decay set)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--uri", help="s3://bucket/prefix of an existing bucket (default: a SeaweedFS server started here)")
    p.add_argument("--endpoint", help="its endpoint URL (credentials from the AWS chain)")
    p.add_argument("--workdir", help="where the local checkpoints and the local storage go (default: the temp dir, "
                                     "where the workers write theirs)")
    args = p.parse_args(argv)
    state = checkpointed_state(args.arch, args.image_size, args.ema)
    predicted = tarflow.checkpoint_bytes(state.model.config, ema=args.ema)
    rates, server = {}, None
    with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=args.workdir) as tmp:
        work = Path(tmp)
        local = work / "local"

        def save(i):
            tarflow.save_checkpoint(local / f"state{i}.pt", state)

        seconds = timed(save, args.repeats)
        size = (local / "state0.pt").stat().st_size
        print(f"bench_storage: {args.arch} @{args.image_size}², checkpoint {size / MB:,.0f} MB "
              f"(tarflow.checkpoint_bytes predicts {predicted / MB:,.0f} MB, {predicted / size - 1:+.2%}); "
              f"{args.repeats} writes each; local disk at {work}")
        rates["local_write"] = report("save_checkpoint to local disk (+ sha256)", size, seconds)
        for extra in range(1, args.repeats):
            (local / f"state{extra}.pt").unlink()
        checkpoint = local / "state0.pt"
        try:
            if args.uri:
                storage = RunStorage(args.uri, endpoint_url=args.endpoint)
            else:
                server, storage = start_seaweedfs(work)
            rates["s3_upload"] = report(f"upload to {storage.describe()[:30]}", size,
                                        upload_rates(checkpoint, storage, args.repeats))
        finally:
            if server is not None:
                server.stop()
        rates["local_storage"] = report("copy to a local storage directory", size,
                                        upload_rates(checkpoint, RunStorage(str(work / "storage")), args.repeats))
    print("\nas config values: storage.local_write_mb_per_s={local_write:.0f} storage.write_mb_per_s={s3_upload:.0f} "
          "(S3), storage.write_mb_per_s={local_storage:.0f} (a local storage.uri)".format(**rates))
    return rates


if __name__ == "__main__":
    main()
