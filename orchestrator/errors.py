"""The one error a user of the orchestrator should see: a problem with their experiment, said in one
paragraph that names the cause, and the wrapper that turns it into an exit code instead of a traceback."""

from __future__ import annotations

import functools
import sys


class ExperimentError(RuntimeError):
    """A problem with the user's experiment, said in one paragraph that names the cause."""


def cli_entry(main):
    """A command's main(): an ExperimentError ends it with its one paragraph on stderr and exit code 2, not a
    traceback (the user's mistake, not a bug)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ExperimentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
