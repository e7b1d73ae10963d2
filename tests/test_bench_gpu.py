"""benchmarks/bench_gpu.py runs end to end on the CPU with a tiny model, so it cannot rot before a GPU
comes along: every section, the checkpointing and accumulation knobs, torch.compile (tracing only)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu(capsys):
    bench = load_bench()
    rows = bench.main(["--device", "cpu", "--knobs", "ckpt+accum2", "--precisions", "fp32", "--steps", "1",
                       "--warmup", "1", "--sample-batch", "2", "--compile-backend", "eager"])
    out = capsys.readouterr().out
    assert [r.section for r in rows] == ["attention", "train", "sample", "compile"]
    assert all(r.status == "ok" for r in rows), [(r.section, r.status) for r in rows]
    train = rows[1]
    assert train.knobs == "accum2+ckpt" and train.images_per_s > 0 and 0 < train.mfu < train.hfu
    assert "flash_attention_for_cpu" in rows[0].knobs
    assert "summary" in out and "knobs accum2+ckpt" in out
    # the closing block: each training run's rate as the cost model's override, with the precision it holds for
    assert f"fp32, 4/GPU, knobs accum2+ckpt: cluster.images_per_sec_per_gpu={train.images_per_s:.4g}" in out


@pytest.mark.slow
def test_bench_gpu_reports_a_failing_run_and_goes_on(capsys):
    bench = load_bench()
    # accumulation over 3 micro-batches of a batch of 4: train_step refuses; the sample section still runs
    rows = bench.main(["--device", "cpu", "--sections", "train,sample", "--precisions", "fp32", "--knobs", "accum3",
                       "--steps", "1", "--warmup", "1", "--sample-batch", "1"])
    assert [r.status for r in rows] == ["error: ConfigError", "ok"]
    assert "[error] train tiny fp32" in capsys.readouterr().out
