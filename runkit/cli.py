"""The one error convention of every command (the `social-refl-*` console scripts).

A user error (a bad path, key, value or file, a full disk) exits with code 2 and one line on stderr that
names what to fix; anything else is a bug and keeps its traceback. The library raises `ConfigError`,
`DataError` and `WeightsError` for bad input, all of them `ValueError`s, and `OSError`s name their path.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, OSError)


def command(run: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """`main(argv=None) -> int` from `run(argv)`: 0 when `run` returns None, 2 on a user error."""

    @functools.wraps(run)
    def main(argv: list[str] | None = None) -> int:
        try:
            code = run(argv)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0 if code is None else int(code)

    return main
