"""The paper's tables and figures, built from MLflow: our numbers beside the paper's.

An experiment's `reference:` block names the metric, the paper's rows (value, source, confidence),
optionally a figure (y against x, one curve per series) and qualitative claims to check.
"""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from .plan import RunPlan
from .records import KIND_TAG, TABLE, runs_frame
from .rundir import table_path
from .storage import RunStorage
from .tracking import Tracker


def collect_runs(tracker: Tracker, experiment: str) -> pd.DataFrame:
    """The experiment's finished results, one row each (runs_frame: a training run, or each evaluation of one
    with the training run's params and metrics underneath), in the order they ran."""
    runs = runs_frame(tracker.client, experiment)
    if not len(runs):
        return runs
    finished = runs["status"] == "FINISHED"
    if "eval_status" in runs:
        finished &= runs["eval_status"].fillna("FINISHED") == "FINISHED"
    return runs[finished].reset_index(drop=True)


def _config_of(row) -> str:
    """P-Ch-T-K as trained, the noise, and what departs from the plain model."""
    noise = "uniform" if row.get("train.noise") == "uniform" else f"σ={row.get('train.noise_std')}"
    shown_when = {"eval.guidance": lambda v: float(v) != 0, "eval.denoise": lambda v: v == "True",
                  "model.nvp": lambda v: v == "False"}  # params are strings
    extras = [f"{k.split('.')[-1]}={row[k]}" for k, show in shown_when.items()
              if k in row and pd.notna(row[k]) and show(row[k])]
    return " ".join([str(row.get("arch")), noise, *extras])


def build_table(reference: dict, runs: pd.DataFrame) -> pd.DataFrame:
    """Rows: the paper's baselines, the paper's TarFlow, then ours. Columns: metric, paper, ours, delta."""
    metric = reference["metric"]
    rows = []
    paper_tarflow = None
    for ref in reference.get("rows", []):
        rows.append({"model": ref["model"], "config": ref.get("config", ""), "metric": metric,
                     "paper": ref.get("value"), "ours": None, "delta": None, "scale": "",
                     "source": ref.get("source", reference.get("source", "")),
                     "confidence": ref.get("confidence", ""), "mlflow_run": ""})
        if ref.get("ours_compare", ref.get("kind") == "tarflow") and paper_tarflow is None:
            paper_tarflow = ref.get("value")
    column = f"metric.{metric}"
    if len(runs) and column in runs:
        for _, run in runs.dropna(subset=[column]).iterrows():
            ours = float(run[column])
            label = run.get("experiment.label")
            rows.append({"model": label if isinstance(label, str) and label else "TarFlow (ours)",
                         "config": _config_of(run), "metric": metric, "paper": None,
                         "ours": ours, "delta": None if paper_tarflow is None else ours - paper_tarflow,
                         "scale": run.get("scale", ""), "source": run["run_name"], "confidence": "",
                         "mlflow_run": run["run_id"]})
    return pd.DataFrame(rows)


def check_claims(reference: dict, runs: pd.DataFrame) -> list[str]:
    """Qualitative claims: the mean metric where `lhs` holds beats the mean where `rhs` holds.
    A value "max"/"min" in a condition means the largest/smallest value of that column."""
    out = []
    for claim in reference.get("claims", []):
        column = f"metric.{claim.get('metric', reference['metric'])}"
        lower = claim.get("better", reference.get("better", "lower")) == "lower"
        if not len(runs) or column not in runs:
            out.append(f"- {claim['text']}: no data yet")
            continue

        def select(cond):
            sel = runs.dropna(subset=[column])
            for key, want in cond.items():
                if key not in sel:
                    return sel.iloc[0:0]
                values = pd.to_numeric(sel[key], errors="coerce")
                if want in ("max", "min"):
                    target = values.max() if want == "max" else values.min()
                    sel = sel[values == target]
                else:
                    sel = sel[sel[key].astype(str).str.lower() == str(want).lower()]
            return sel[column]

        lhs, rhs = select(claim["lhs"]), select(claim["rhs"])
        if lhs.empty or rhs.empty:
            out.append(f"- {claim['text']}: no data yet")
            continue
        a, b = lhs.mean(), rhs.mean()
        holds = a < b if lower else a > b
        out.append(f"- {claim['text']}: {'holds' if holds else 'NOT visible here'} ({a:.4g} vs {b:.4g})")
    return out


def plot_figure(figure: dict, runs: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, series = figure["x"], f"metric.{figure['y']}", figure.get("series")
    if not len(runs) or y not in runs or x not in runs:
        return None
    data = runs.dropna(subset=[y]).copy()
    data[x] = pd.to_numeric(data[x], errors="coerce")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    groups = data.groupby(series) if series and series in data else [(None, data)]
    for label, g in groups:
        g = g.groupby(x)[y].mean().sort_index()
        ax.plot(g.index, g.values, marker="o", label=f"{series.split('.')[-1]}={label}" if label is not None else None)
    ax.set_xlabel(figure.get("xlabel", x))
    ax.set_ylabel(figure.get("ylabel", figure["y"]))
    ax.set_title(figure.get("title", ""))
    if series:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render(table: pd.DataFrame, claims: list[str], title: str) -> str:
    shown = table.drop(columns=["mlflow_run"]).astype(object)
    shown = shown.where(shown.notna(), None)  # blanks, not "nan", for the cells a row does not have
    md = shown.to_markdown(index=False, floatfmt=".4g", missingval="") if len(table) else "(empty)"
    return f"## {title}\n\n{md}\n" + ("\nClaims of the paper, as seen in our runs:\n" + "\n".join(claims) + "\n"
                                     if claims else "")


def log_table(client, run_id: str, frame, artifact_file: str) -> None:
    """A DataFrame as an MLflow table (the UI shows a .json logged this way as a table). client.log_table
    appends to a table the run already has; a republished table replaces it instead."""
    frame = frame.astype(object).where(frame.notna(), "")  # blank cells, not "null"
    folder = posixpath.dirname(artifact_file) or None
    if artifact_file not in {a.path for a in client.list_artifacts(run_id, folder)}:
        client.log_table(run_id, data=frame, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the same file format, written over the old one
        path = Path(tmp) / posixpath.basename(artifact_file)
        frame.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path), folder)


def publish_table(plan: RunPlan, storage: RunStorage, tracking_uri: str) -> str:
    """Build, print, store and log the experiment's table (and figure). Returns the markdown."""
    cfg = plan.cfg
    if cfg.reference is None:
        return ""
    reference = OmegaConf.to_container(cfg.reference, resolve=True)
    tracker = Tracker(tracking_uri)
    runs = collect_runs(tracker, plan.experiment_name)
    table = build_table(reference, runs)
    claims = check_claims(reference, runs)
    text = render(table, claims, cfg.experiment.title or cfg.experiment.name)
    exp_id = tracker.experiment_id(plan.experiment_name)
    run_id = tracker.start_run(exp_id, f"table-{plan.experiment_name}", f"{cfg.experiment.name}/table", {},
                               tags={KIND_TAG: TABLE})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {"table.md": text, "table.csv": table.to_csv(index=False),
                 "table.tex": table.drop(columns=["mlflow_run"]).to_latex(index=False, float_format="%.4g",
                                                                          na_rep="")}
        for name, content in files.items():
            (tmp / name).write_text(content)
            storage.write_text(table_path(plan.experiment_name, name), content)
        figure = reference.get("figure")
        if figure and plot_figure(figure, runs, tmp / "figure.png"):
            storage.write_bytes(table_path(plan.experiment_name, "figure.png"), (tmp / "figure.png").read_bytes())
        tracker.client.log_artifacts(run_id, str(tmp), "table")
    log_table(tracker.client, run_id, table, "table/table.json")  # shown as a table in the UI
    tracker.finish(run_id, "FINISHED")
    print(text, flush=True)
    return text
