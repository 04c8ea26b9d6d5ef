"""One exception type for every user-facing problem: the CLI prints its message on one line and exits 2."""


class UpbenchError(Exception):
    """A problem the user can fix (bad name, missing file, offline download); the message says how."""

    exit_code = 2


class UnknownNameError(UpbenchError, KeyError):
    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""
