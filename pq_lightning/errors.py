"""Expected failures: what the user can fix (bad input, a busy or foreign output folder) versus bugs.

The command line prints an expected failure as one line that says what to do next, and a bug with
its full traceback (``--verbose`` shows the traceback for both).
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; its message says how, in one line."""


#: Exception types the command line treats as the user's to fix. ``ValueError`` covers settings the
#: library refuses (infeasible budgets, unknown names); the ``OSError`` kinds cover paths.
EXPECTED = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is an expected failure (one line) rather than a bug (a traceback)."""
    return isinstance(exc, EXPECTED)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of the exception's message (its type when the message is empty)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
