"""The paper's tables and figures at CPU scale: FID through the real run, the report rebuilt from
MLflow without training, figures as PNGs, and the claims check."""

import time

import pandas as pd
import pytest
from conftest import EXPERIMENTS, run_main
from mlflow.tracking import MlflowClient

from orchestrator.report import main as report_cli
from orchestrator.run import main as run_cli
from orchestrator.tables import build_table, check_claims

TEST = ["scale=test", "train.steps=20"]
COMMANDS = {"orchestrator.run": run_cli, "orchestrator.report": report_cli}


def cli(module, args, cwd):
    """In this process, on the session's Ray (the CLI's own process is tested in test_run.py)."""
    return run_main(COMMANDS[module], args, cwd)


def test_table_rows_deltas_and_claims():
    reference = {"metric": "fid", "rows": [{"model": "BigGAN", "value": 4.06, "confidence": "C"},
                                            {"model": "TarFlow (paper)", "kind": "tarflow", "value": 5.0}],
                 "claims": [{"text": "guidance helps", "lhs": {"eval.guidance": "max"},
                             "rhs": {"eval.guidance": "min"}},
                            {"text": "denoising helps", "lhs": {"eval.denoise": True}, "rhs": {"eval.denoise": False}}]}
    runs = pd.DataFrame([
        {"run_name": "a", "run_id": "r1", "scale": "smoke", "arch": "2-64-2-2", "train.noise_std": "0.05",
         "eval.guidance": "0.0", "eval.denoise": "False", "metric.fid": 9.0},
        {"run_name": "a", "run_id": "r2", "scale": "smoke", "arch": "2-64-4-1", "train.noise_std": "0.05",
         "eval.guidance": "2.0", "eval.denoise": "False", "metric.fid": 7.5},  # a depth sweep's trial
    ])
    table = build_table(reference, runs)
    assert table["model"].tolist() == ["BigGAN", "TarFlow (paper)", "TarFlow (ours)", "TarFlow (ours)"]
    ours = table[table["model"] == "TarFlow (ours)"]
    assert ours["delta"].tolist() == pytest.approx([4.0, 2.5])
    assert ours["config"].tolist() == ["2-64-2-2 σ=0.05", "2-64-4-1 σ=0.05 guidance=2.0"]
    claims = check_claims(reference, runs)
    assert claims[0].startswith("- guidance helps: holds (7.5 vs 9)")
    assert claims[1] == "- denoising helps: no data yet"


@pytest.mark.slow
def test_fid_table_end_to_end_report_rebuild_and_new_eval_settings(tmp_path, mlflow_server, local_ray):
    exp = f"t3-{time.time_ns()}"
    args = [str(EXPERIMENTS / "table3_imagenet64_cond.yaml"), *TEST, f"experiment.name={exp}",
            f"tracking.uri={mlflow_server}"]
    r = cli("orchestrator.run", args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| TarFlow (paper)" in r.stdout and "4.21" in r.stdout
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    train = [x for x in runs if x.data.tags.get("tarflow.kind") == "run"]
    tables = [x for x in runs if x.data.tags.get("tarflow.kind") == "table"]
    assert len(train) == 1 and len(tables) == 1
    fid = train[0].data.metrics["fid"]
    assert 0 < fid < 1000
    stats = list((tmp_path / "runs" / "fid_stats").iterdir())
    assert len(stats) == 1 and stats[0].name.startswith("fid-ref-fashion_mnist-16px-")  # cached for the next run

    # rebuilt from MLflow alone: no training, the same numbers, one table run
    r = cli("orchestrator.report", args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    csv = pd.read_csv(tmp_path / "runs" / "tables" / exp / "table.csv")
    ours = csv[csv["model"] == "TarFlow (ours)"]
    assert ours["ours"].tolist() == pytest.approx([fid])
    assert ours["delta"].tolist() == pytest.approx([fid - 4.21])
    assert "\\begin{tabular}" in (tmp_path / "runs" / "tables" / exp / "table.tex").read_text()
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert len([x for x in runs if x.data.tags.get("tarflow.kind") == "table"]) == 1
    assert {a.path for a in client.list_artifacts(tables[0].info.run_id, "table")} >= {
        "table/table.md", "table/table.csv", "table/table.tex"}

    # new eval settings of the finished run: evaluated on its final checkpoint in a nested run, not retrained
    loss = [m.step for m in client.get_metric_history(train[0].info.run_id, "loss")]
    r = cli("orchestrator.run", [*args, "eval.guidance=3.0"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "evaluating the new eval settings on its final checkpoint checkpoint_00000020" in r.stdout
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    (again,) = [x for x in runs if x.data.tags.get("tarflow.kind") == "evaluation"]
    assert again.data.tags["mlflow.parentRunId"] == train[0].info.run_id and again.info.status == "FINISHED"
    assert again.data.params["eval.guidance"] == "3.0" and 0 < again.data.metrics["fid"] < 1000
    assert [a.path for a in client.list_artifacts(again.info.run_id, "samples")] == ["samples/samples.png"]
    assert [m.step for m in client.get_metric_history(train[0].info.run_id, "loss")] == loss  # nothing retrained
    csv = pd.read_csv(tmp_path / "runs" / "tables" / exp / "table.csv")
    assert sorted(csv[csv["model"] == "TarFlow (ours)"]["ours"]) == pytest.approx(sorted([fid, again.data.metrics[
        "fid"]]))  # both settings are rows of the table

    # both settings are done now: the same commands change nothing
    for extra in ([], ["eval.guidance=3.0"]):
        r = cli("orchestrator.run", [*args, *extra], tmp_path)
        assert r.returncode == 0 and "already finished and evaluated with these settings" in r.stdout
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert len([x for x in runs if x.data.tags.get("tarflow.kind") == "evaluation"]) == 1


@pytest.mark.slow
def test_guidance_figure_from_sample_time_sweep(tmp_path, mlflow_server, local_ray):
    exp = f"fig-{time.time_ns()}"
    args = [str(EXPERIMENTS / "fig_guidance.yaml"), *TEST, f"experiment.name={exp}",
            f"tracking.uri={mlflow_server}", "sweep.sample_axes={eval.guidance: [0.0, 2.0]}", "cluster.num_workers=1"]
    r = cli("orchestrator.run", args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    evals = [x for x in runs if x.data.tags.get("tarflow.kind") == "evaluation"]
    trials = [x for x in runs if x.data.tags.get("tarflow.trial")]
    assert len(trials) == 1 and len(evals) == 2  # trained once, evaluated at both weights
    assert all("fid" in e.data.metrics for e in evals)
    png = tmp_path / "runs" / "tables" / exp / "figure.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [x for x in runs if x.data.tags.get("tarflow.kind") == "table"][0]
    assert "table/figure.png" in {a.path for a in client.list_artifacts(table.info.run_id, "table")}
    assert "guidance (w=1) improves FID over no guidance: no data yet" in r.stdout  # w=1 was not swept here
    best = min(evals, key=lambda e: e.data.metrics["fid"])
    shown = f"guidance={best.data.params['eval.guidance']} -> "  # no train axes: the best is a setting
    assert f"Best (min fid): {shown}" in r.stdout and f"[summary] {exp}/sweep: best {shown}" in r.stdout, r.stdout
    # the table lists the weights in the grid's order, under the plain run's name (its only trial)
    csv = pd.read_csv(tmp_path / "runs" / "tables" / exp / "table.csv")
    ours = csv[csv["model"] == "TarFlow (ours)"]
    assert [("guidance=2.0" in c) for c in ours["config"]] == [False, True], ours["config"].tolist()
    assert set(ours["source"]) == {f"{exp}/4-64-2-2/0.05"} == {trials[0].info.run_name}

    # a new weight later: evaluated on the trial's final checkpoint; the others are not evaluated again
    axes = args.index("sweep.sample_axes={eval.guidance: [0.0, 2.0]}")
    args[axes] = "sweep.sample_axes={eval.guidance: [0.0, 2.0, 3.0]}"
    r = cli("orchestrator.run", args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "evaluating 1 new sample-time setting(s) on the final checkpoints of 1 finished trial(s)" in r.stdout
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    evals = [x for x in runs if x.data.tags.get("tarflow.kind") == "evaluation"]
    assert sorted(e.data.params["eval.guidance"] for e in evals) == ["0.0", "2.0", "3.0"]
    assert len([x for x in runs if x.data.tags.get("tarflow.trial")]) == 1
    loss = client.get_metric_history(trials[0].info.run_id, "loss")
    assert len(loss) == len({m.step for m in loss})  # not retrained
