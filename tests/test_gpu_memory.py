"""Will it fit? The GPU memory of a run in the dry run, the launch check that refuses a GPU run which cannot
fit before any cluster work (orchestrator.run and orchestrator.submit), and every paper experiment fitting
the GPUs its own config names. All in-process and on the CPU: the estimates come from the model's shapes."""

import pytest
from conftest import EXPERIMENTS, ROOT, run_main
from devservers import free_port

from orchestrator import run as run_mod
from orchestrator import submit as submit_mod
from orchestrator.errors import ExperimentError
from orchestrator.gpu_memory import check_launch, estimate_memory
from orchestrator.lifecycle import load_experiment
from orchestrator.sweep import sweep_of

TABLE2 = str(EXPERIMENTS / "table2.yaml")
PAPER_EXPERIMENTS = sorted(EXPERIMENTS.glob("*.yaml"))
# table2 at paper scale as the paper's YAML had it before: 256 over 8 A100 80 GB in fp32, 107.5 GiB per GPU
TABLE2_ON_ONE_NODE = ["cluster.num_workers=8"]
# a run that passes every other check here (Fashion-MNIST is on this disk) and cannot fit an A100 40 GB
TOO_BIG = ["data=fashion_mnist", "train.batch_size=2048", "cluster=a100_40gb"]


def estimates(experiment, overrides=()):
    plan, _, _ = load_experiment(str(experiment), list(overrides), require_data=False)
    return plan, estimate_memory(plan, sweep_of(plan, require_data=False))


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS, ids=lambda p: p.stem)
def test_every_paper_experiment_fits_the_gpus_its_config_names(experiment, tmp_path, monkeypatch):
    seen = []

    def estimate_and_keep(plan, sweep):
        seen.append((plan, estimate_memory(plan, sweep)))
        return seen[-1][1]

    monkeypatch.setattr(run_mod, "estimate_memory", estimate_and_keep)
    r = run_main(run_mod.main, [experiment, "--dry-run"], tmp_path)  # paper scale
    assert r.returncode == 0, r.stderr
    memory = r.stdout[r.stdout.index("\ngpu memory"):]
    assert "fits: " in memory and "does NOT fit" not in memory and "not checked" not in memory, memory
    [(plan, found)] = seen
    assert plan.cfg.cluster.use_gpu and plan.cfg.cluster.gpu_memory_gb  # a preset with the card's memory
    assert found and check_launch(plan, found) == []  # what the launch checks: it passes, silently


def test_the_dry_run_prints_memory_by_part_and_the_options(tmp_path):
    r = run_main(run_mod.main, [TABLE2, *TABLE2_ON_ONE_NODE, "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout[r.stdout.index("\ngpu memory"):]
    assert "32 images (256 / 8 workers) in 1 micro-batch of 32, fp32, activation checkpointing off" in out
    for part in ("params 1.7", "gradients 1.7", "optimizer 3.4", "ema 0.0", "activations 96.9", "ddp buckets 1.7",
                 "weight casts 0.0", "transient 0.5", "CUDA overhead 1.5", "total 107.5"):
        assert part in out, (part, out)
    assert "does NOT fit: 71.3 GiB usable (90% of cluster.gpu_memory_gb=79.2)" in out
    options = [line.split()[0] for line in out.splitlines() if line.startswith("              ")]
    assert options == ["train.grad_accum_steps=2", "train.activation_checkpointing=true", "cluster.num_workers=16",
                       "train.precision=bf16"], out
    assert "+33% training FLOPs" in out and "cluster.check_memory=false" in out
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_does_not_fit_is_refused_before_any_work(tmp_path):
    r = run_main(run_mod.main, [TABLE2, *TOO_BIG], tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip()
    assert err.startswith("error: table2.yaml: training does not fit the GPU: it needs 107.3 GiB per GPU"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err  # one paragraph
    for fragment in ("35.5 GiB is usable (90% of cluster.gpu_memory_gb=39.4)", "Nothing was started",
                     "train.grad_accum_steps=4 (34.3 GiB: 4 micro-batches of 32",
                     "train.activation_checkpointing=true (18.6 GiB: +33% training FLOPs",
                     "cluster.num_workers=64 (34.3 GiB: 64 GPUs at 32 images each, global batch 2048 unchanged)",
                     "add cluster.check_memory=false"):
        assert fragment in err, (fragment, err)
    assert list(tmp_path.iterdir()) == []  # no storage, tracking store or Ray session was touched


def test_the_refusal_names_precision_as_the_last_resort():
    plan, found = estimates(TABLE2, TABLE2_ON_ONE_NODE)
    with pytest.raises(ExperimentError) as e:
        check_launch(plan, found)
    text = str(e.value)
    order = [text.index(o) for o in ("train.grad_accum_steps=2 (58.8 GiB", "train.activation_checkpointing=true",
                                     "cluster.num_workers=16 (58.8 GiB", "train.precision=bf16 (65.7 GiB")]
    assert order == sorted(order) and "changes the numerics" in text, text


def test_check_memory_false_launches_anyway(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(run_mod, "run_experiment", lambda plan, *a, **k: launched.append(plan) or {})
    monkeypatch.setattr(run_mod, "publish_table", lambda *a, **k: None)
    r = run_main(run_mod.main, [TABLE2, *TOO_BIG, "cluster.check_memory=false"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(launched) == 1
    assert "[orchestrator] warning: the estimate says this run does not fit the GPU (107.3 GiB" in r.stdout
    dry = run_main(run_mod.main, [TABLE2, *TOO_BIG, "cluster.check_memory=false", "--dry-run"], tmp_path)
    assert dry.returncode == 0 and "the launch check is off (cluster.check_memory=false)" in dry.stdout


def test_submit_refuses_before_contacting_the_cluster():
    port = free_port()
    r = run_main(submit_mod.main, [TABLE2, *TABLE2_ON_ONE_NODE, "--address", f"http://127.0.0.1:{port}"], ROOT)
    assert r.returncode == 2 and "training does not fit the GPU" in r.stderr, r.stderr
    assert "Jobs API" not in r.stderr and "[submit]" not in r.stdout


def test_every_trial_of_a_sweep_is_checked():
    plan, found = estimates(EXPERIMENTS / "sweep_patch_depth.yaml", ["cluster=a100_40gb"])
    assert len(found) == 4  # patch size 2, 4 × layers per block 4, 8: only 2-768-8-8 (65.8 GiB) is over 35.5
    with pytest.raises(ExperimentError) as e:
        check_launch(plan, found)
    assert ("[1 of 4 sweep trial configs do not fit; the largest of them: model.patch_size=2 "
            "model.layers_per_block=8]" in str(e.value)), str(e.value)


def test_a_gpu_without_its_memory_is_run_unchecked_and_said_so(tmp_path):
    r = run_main(run_mod.main, [TABLE2, "cluster=gpu", "--dry-run"], tmp_path)
    assert r.returncode == 0 and "total 58.8" in r.stdout
    assert "not checked against the GPU: cluster.gpu_memory_gb is not set" in r.stdout
    plan, found = estimates(TABLE2, ["cluster=gpu"])
    [note] = check_launch(plan, found)
    assert "cluster.gpu_memory_gb" in note and "cluster=a100_80gb" in note


def test_cpu_runs_say_one_line_and_check_nothing(tmp_path):
    r = run_main(run_mod.main, [TABLE2, "scale=test", "--dry-run"], tmp_path)
    assert r.returncode == 0
    assert [line for line in r.stdout.splitlines() if "gpu memory" in line.lower()] == [
        "gpu memory  not checked: a CPU run (cluster.use_gpu=false)"]
    plan, found = estimates(EXPERIMENTS / "table3_imagenet128_cond.yaml", ["scale=smoke"])
    assert found == [] and check_launch(plan, found) == []
    # the paper's memory knobs stay with the paper's GPUs
    assert plan.cfg.train.grad_accum_steps == 1 and not plan.cfg.train.activation_checkpointing


def test_the_workers_get_the_knobs():
    from orchestrator.plan import train_config  # what each worker builds its training state from

    plan, _ = estimates(EXPERIMENTS / "table3_imagenet128_cond.yaml")
    train = train_config(plan.cfg)
    assert train.grad_accum_steps == 2 and not train.activation_checkpointing
    plan, _ = estimates(TABLE2, ["train.activation_checkpointing=true", "train.grad_accum_steps=4"])
    train = train_config(plan.cfg)
    assert train.activation_checkpointing and train.grad_accum_steps == 4
