"""The one error a user of the orchestrator should see: a problem with their experiment, said in one
paragraph that names the cause, and the wrapper that turns it into an exit code instead of a traceback."""

from __future__ import annotations

import functools
import sys

# how a worker's checkpoint error starts; the driver finds it in the error Ray wraps around it
RESUME_FAILED = "cannot resume from checkpoint"


class ExperimentError(RuntimeError):
    """A problem with the user's experiment, said in one paragraph that names the cause."""

    exit_code = 2


class RunFailed(ExperimentError):
    """A run that started and could not go on (e.g. its storage went away): said in one paragraph, exit 1."""

    exit_code = 1


def cli_entry(main):
    """A command's main(): an ExperimentError ends it with its one paragraph on stderr and its exit code (2 for
    the user's mistake, 1 for a run that failed), not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ExperimentError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code

    return wrapper
