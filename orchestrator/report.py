"""python -m orchestrator.report EXPERIMENT.yaml [key=value ...]

Rebuilds an experiment's table (and figure) from MLflow without training: our numbers beside the paper's,
written as markdown, CSV and LaTeX next to the checkpoints and logged to MLflow.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ExperimentError, cli_entry
from .lifecycle import catch_up_experiment, load_experiment
from .tables import publish_table
from .tracking import Tracker


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    plan, storage, tracking_uri = load_experiment(args.experiment, args.overrides, require_data=False)
    if plan.cfg.reference is None:
        raise ExperimentError(f"{plan.source} has no reference: block, so there is no table to build")
    tracker = Tracker(tracking_uri)
    catch_up_experiment(storage, plan.cfg.experiment.name, tracker)  # what MLflow missed while it was down
    publish_table(plan, storage, tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
