"""What the `parassm` command reports: its exit status and its two kinds of error."""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Something wrong with the command line (exit status 2, with the usage)."""


class CLIError(Exception):
    """The computation failed, with a one-line message (exit status 1)."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of an error's message (its type if it has none)."""
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__
