"""The project's one error type for things a user must fix, and how every command reports it.

A bad setting, a missing folder, an unreadable image or a run that cannot go on is said in
one line (`error: ...` on stderr) with an exit code, never as a traceback."""

import functools
import re
import sys


class UserError(ValueError):
    """Something the user must fix, said in one line; `exit_code` 2 for bad input, 1 for a
    run that failed on the way."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(error: Exception) -> str:
    """The user's message, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return re.sub(r"^[\w.]*UserError: ", "", lines[-1])


def command(main):
    """Wrap a script's `main(argv) -> int`: a UserError becomes `error: ...` and its exit code."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return error.exit_code

    return wrapped
