"""What will it cost? The dry run's bill before a launch: GPU-hours at the precision the run computes in (and what
TF32 or bf16 would cost instead), the checkpoint bill (size from the model's shapes, write and upload time, share
of training time), and one budget table over every paper experiment. In-process, on the CPU, no Ray."""

import sys

import pytest
import torch
from conftest import EXPERIMENTS, run_main

import tarflow
from orchestrator import budget as budget_mod
from orchestrator import run as run_mod
from orchestrator.budget import budget_rows
from orchestrator.config import compose_experiment
from orchestrator.cost import (
    CHECKPOINT_SHARE_LIMIT,
    LOCAL_WRITE_MB_PER_S,
    S3_WRITE_MB_PER_S,
    checkpoint_bill,
    compute_precision,
    estimate_cost,
)
from orchestrator.plan import config_hash, plan_run, train_config

TABLE2 = str(EXPERIMENTS / "table2.yaml")
PAPER_EXPERIMENTS = sorted(EXPERIMENTS.glob("*.yaml"))
IMAGES = 100 * (1_281_167 // 256) * 256  # table2: 100 epochs of ImageNet 64's training set, global batch 256


def plan(*overrides, experiment=TABLE2):
    return plan_run(compose_experiment(experiment, list(overrides)), require_data=False)


def hours(*overrides):
    return estimate_cost(plan(*overrides)).gpu_hours


# ---------------------------------------------------------------------------------------------
# Cost by precision


def test_table2_in_fp32_costs_fp32_speed_and_tf32_or_bf16_would_cost_less():
    fp32, tf32, bf16 = hours(), hours("train.tf32=true"), hours("train.precision=bf16")
    assert fp32 >= 8 * bf16
    assert 1.2 * bf16 <= tf32 <= 4 * bf16
    # the figures themselves: FLOPs at each precision's utilisation (measured on an H200) of the A100's peak
    flops = plan().model.flops_per_image(training=True)
    for got, peak, mfu in ((fp32, 19.5e12, 0.7), (tf32, 156e12, 0.3), (bf16, 312e12, 0.4)):
        assert got == pytest.approx(16 * IMAGES / (16 * peak * mfu / flops) / 3600)


def test_an_unknown_training_set_size_gives_no_cost():
    assert estimate_cost(plan("data.train_images=null")) is None
    assert estimate_cost(plan("data.train_images=null", "train.steps=500")).images == 500 * 256


def test_activation_checkpointing_costs_its_recompute():
    from tarflow.memory import recompute_flops_per_image

    plain, ckpt = plan(), plan("train.activation_checkpointing=true")
    flops = plain.model.flops_per_image(training=True)
    extra = recompute_flops_per_image(plain.model)
    assert 0.3 < extra / flops < 0.34  # one more forward of the layers: about a third of forward + backward
    assert estimate_cost(ckpt).hours == pytest.approx(estimate_cost(plain).hours * (flops + extra) / flops)
    assert "recomputed: activation checkpointing" in estimate_cost(ckpt).source
    # a measured throughput is taken as measured (with the knobs the run uses)
    measured = "cluster.images_per_sec_per_gpu=500"
    assert estimate_cost(plan(measured, "train.activation_checkpointing=true")).hours == pytest.approx(
        estimate_cost(plan(measured)).hours)


def test_precision_is_resolved_as_the_workers_resolve_it():
    assert compute_precision(plan().cfg) == "fp32"                       # table2: fp32, TF32 off, as the authors
    assert compute_precision(plan("train.tf32=true").cfg) == "tf32"
    assert compute_precision(plan("train.precision=auto").cfg) == "fp32"  # uniform noise: fp32 under auto
    gaussian = plan(experiment=EXPERIMENTS / "table3_imagenet64_cond.yaml")
    assert gaussian.cfg.train.precision == "auto" and compute_precision(gaussian.cfg) == "bf16"


def test_the_presets_carry_each_precisions_peak():
    for preset, peaks in (("a100_40gb", (312, 156, 19.5)), ("a100_80gb", (312, 156, 19.5)),
                          ("h100_80gb", (989, 495, 67)), ("h200", (989, 495, 67))):
        c = compose_experiment(TABLE2, [f"cluster={preset}"]).cluster
        assert (c.peak_tflops.bf16, c.peak_tflops.tf32, c.peak_tflops.fp32) == peaks, preset
        assert c.gpu_type


def test_a_measured_throughput_wins_and_gpu_peak_tflops_overrides_the_runs_precision():
    measured = estimate_cost(plan("cluster.images_per_sec_per_gpu=50"))
    assert measured.gpu_hours == pytest.approx(16 * IMAGES / (16 * 50) / 3600)
    assert "cluster.images_per_sec_per_gpu" in measured.source
    # the measured rate holds for the run's precision only: another is estimated from the FLOPs
    assert estimate_cost(plan("cluster.images_per_sec_per_gpu=50"), precision="tf32").images_per_sec == \
        pytest.approx(estimate_cost(plan(), precision="tf32").images_per_sec)
    # one number overrides the peak of the precision the run computes in
    assert hours("cluster.gpu_peak_tflops=39") == pytest.approx(hours() / 2)
    assert hours("cluster.peak_tflops.fp32=39") == pytest.approx(hours() / 2)


def test_the_dry_run_names_precision_and_peak_and_lists_the_faster_precisions(tmp_path):
    r = run_main(run_mod.main, [TABLE2, "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    cost = r.stdout[r.stdout.index("\ncost "):r.stdout.index("\ncheckpoints")]
    assert "in fp32" in cost and "19.5 TFLOP/s" in cost, cost
    options = [line.split()[0] for line in cost.splitlines() if line.startswith("              ")]
    assert options == ["train.tf32=true", "train.precision=bf16"], cost
    assert "156 TFLOP/s" in cost and "312 TFLOP/s" in cost and "likelihood" in cost
    assert f"{hours('train.tf32=true'):,.0f} GPU-hours" in cost
    bf16 = run_main(run_mod.main, [TABLE2, "train.precision=bf16", "--dry-run"], tmp_path)
    cost = bf16.stdout[bf16.stdout.index("\ncost "):bf16.stdout.index("\ncheckpoints")]
    assert "in bf16" in cost and "312 TFLOP/s" in cost and "train.tf32=true" not in cost
    assert list(tmp_path.iterdir()) == []


def test_tf32_is_part_of_the_run_identity_and_reaches_the_train_config():
    on = compose_experiment(TABLE2, ["train.tf32=true"])
    assert config_hash(on) != config_hash(compose_experiment(TABLE2, []))
    assert train_config(on).tf32 and not train_config(compose_experiment(TABLE2, [])).tf32


def test_tf32_leaves_a_cpu_process_alone():
    before = torch.backends.cuda.matmul.allow_tf32
    model = tarflow.TarFlow(tarflow.TarFlowConfig.from_string("4-64-1-1", image_size=8, in_channels=1))
    tarflow.make_train_state(model, tarflow.TrainConfig(tf32=not before))
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_switches_cuda_matmuls():
    model = tarflow.TarFlow(tarflow.TarFlowConfig.from_string("4-64-1-1", image_size=8, in_channels=1)).cuda()
    try:
        tarflow.make_train_state(model, tarflow.TrainConfig(tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32
        tarflow.make_train_state(model, tarflow.TrainConfig(tf32=False))
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


# ---------------------------------------------------------------------------------------------
# The checkpoint bill


@pytest.mark.parametrize("overrides", [[], ["train.ema_decay=0.999"]], ids=["plain", "ema"])
def test_the_predicted_checkpoint_size_is_the_size_of_the_file_written(overrides, tmp_path):
    p = plan("scale=smoke", *overrides)
    bill = checkpoint_bill(p, estimate_cost(p))
    state = tarflow.make_train_state(tarflow.TarFlow(p.model), train_config(p.cfg))
    x = torch.randint(0, 256, (4, p.model.in_channels, p.model.image_size, p.model.image_size)) / 127.5 - 1
    tarflow.train_step(state, x)  # AdamW's moments exist from its first step on
    written = tarflow.save_checkpoint(tmp_path / "state.pt", state, epoch=0, batch_in_epoch=1).stat().st_size
    assert bill.size_bytes == pytest.approx(written, rel=0.05)
    assert bill.parts["ema"] > 0 if overrides else bill.parts["ema"] == 0


def test_the_checkpoint_share_of_training_time_follows_the_write_rates():
    p = plan("train.precision=bf16", "storage=s3", "storage.async_upload=false")
    cost = estimate_cost(p)
    bill = checkpoint_bill(p, cost)
    size = bill.size_bytes
    assert bill.local_seconds == pytest.approx(size / (LOCAL_WRITE_MB_PER_S * 1e6))
    assert bill.upload_seconds == pytest.approx(size / (S3_WRITE_MB_PER_S * 1e6))
    interval = 1000 * cost.step_seconds
    assert bill.share == pytest.approx((bill.local_seconds + bill.upload_seconds) / interval)
    # asynchronous: only the local write holds training up; the upload overlaps the next interval
    later = checkpoint_bill(plan("train.precision=bf16", "storage=s3"), cost)
    assert later.share == pytest.approx(bill.local_seconds / interval)
    assert later.local_disk_bytes == 2 * size
    configured = checkpoint_bill(plan("train.precision=bf16", "storage=s3", "storage.write_mb_per_s=50",
                                      "storage.local_write_mb_per_s=1000", "storage.async_upload=false"), cost)
    assert configured.upload_seconds == pytest.approx(size / 50e6)
    assert configured.local_seconds == pytest.approx(size / 1e9)


def test_a_costly_checkpoint_interval_comes_with_one_that_keeps_it_under_the_limit(tmp_path):
    slow = ["train.precision=bf16", "storage=s3", "storage.async_upload=false", "train.checkpoint_every=200"]
    p = plan(*slow)
    bill = checkpoint_bill(p, estimate_cost(p))
    assert bill.share > CHECKPOINT_SHARE_LIMIT
    every = bill.suggested_every
    assert every > 200
    fixed = plan(*slow, f"train.checkpoint_every={every}")
    assert checkpoint_bill(fixed, estimate_cost(fixed)).share <= CHECKPOINT_SHARE_LIMIT
    r = run_main(run_mod.main, [TABLE2, *slow, "--dry-run"], tmp_path)
    text = r.stdout[r.stdout.index("\ncheckpoints"):]
    assert f"train.checkpoint_every={every}" in text and "storage.async_upload=true" in text, text
    assert "GiB of local disk" in text


# ---------------------------------------------------------------------------------------------
# One budget for the paper


def test_the_budget_of_every_paper_experiment_is_one_table_with_a_total(tmp_path, monkeypatch):
    seen = []

    def rows_and_keep(experiments, overrides):
        seen.extend(budget_rows(experiments, overrides))
        return seen

    monkeypatch.setattr(budget_mod, "budget_rows", rows_and_keep)
    r = run_main(run_mod.main, [*PAPER_EXPERIMENTS, "--dry-run", "cluster.price_per_gpu_hour=2.5"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("|")]
    header, rows, total = lines[0], lines[2:-1], lines[-1]
    for column in ("experiment", "GPUs", "precision", "memory", "checkpoint", "days", "GPU-hours", "price"):
        assert column in header, header
    assert [row.split("|")[1].strip() for row in rows] == [p.stem for p in PAPER_EXPERIMENTS]
    assert all("fits" in row and "NOT" not in row for row in rows), rows
    assert "fp32" in rows[[p.stem for p in PAPER_EXPERIMENTS].index("table2")]
    assert total.split("|")[1].strip() == "total"
    gpu_hours = sum(row.bill.gpu_hours for row in seen)
    assert f"{gpu_hours:,.0f}" in total and f"{2.5 * gpu_hours:,.0f}" in total
    assert list(tmp_path.iterdir()) == []  # no storage, tracking store or Ray session
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_a_sweep_costs_every_trial_at_its_own_config():
    depth = EXPERIMENTS / "sweep_patch_depth.yaml"
    [row] = budget_rows([str(depth)], [])
    assert len(row.bill.costs) == 4
    by_trial = sorted(c.gpu_hours for c in row.bill.costs)
    assert by_trial[0] < by_trial[-1] / 4  # patch 4, 4 layers per block against patch 2, 8 layers
    assert row.bill.gpu_hours == pytest.approx(sum(by_trial))


def test_a_sweep_of_unknown_length_still_counts_and_sizes_every_trial():
    depth = EXPERIMENTS / "sweep_patch_depth.yaml"
    [row] = budget_rows([str(depth)], ["data.train_images=null"])
    assert row.bill is None  # no length: no GPU-hours, but the trials are known
    assert budget_mod.runs_cell(row).startswith("4 trials"), budget_mod.runs_cell(row)
    known = budget_rows([str(depth)], [])[0]
    assert sorted(b.size_bytes for b in row.checkpoints) == sorted(b.size_bytes for b in known.checkpoints)


def test_several_experiments_are_read_together_only_for_the_budget(tmp_path):
    r = run_main(run_mod.main, [TABLE2, EXPERIMENTS / "afhq256.yaml"], tmp_path)
    assert r.returncode == 2 and "--dry-run" in r.stderr
    assert list(tmp_path.iterdir()) == []
