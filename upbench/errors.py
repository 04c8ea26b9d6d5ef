"""The exception types of every user-facing problem: the CLI prints the message on one line and exits with the
type's code (2: a usage error the user can fix before running; 1: a run that ended without a valid number)."""


class UpbenchError(Exception):
    """A problem the user can fix (bad name, missing file, offline download); the message says how."""

    exit_code = 2


class RunFailed(UpbenchError):
    """A job that ran but has no valid result (a diverged probe, a degenerate metric): recorded as a failure under
    ``<results>/failed/``, never as a row."""

    exit_code = 1


class UnknownNameError(UpbenchError, KeyError):
    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""
