"""Bad preference data: the error, the fix every bad-row message ends with, and the tally of skipped rows."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("error", "skip")
FIX = (". Fix or remove the row (social-refl-check-pairs writes a clean copy), or set on_bad_row=skip to "
       "drop bad rows.")


class DataError(ValueError):
    """Bad preference data; the message names the file, the row and how to fix it."""


class EmptySplitError(DataError):
    """No preference pair is left in a set or split (bad rows skipped, ties dropped, or no rows at all):
    a caller may go on without it (training without validation) where an error in a row would stop it.
    `n_bad_rows`: the bad rows skipped on the way, so a caller that goes on still counts them."""

    def __init__(self, message: str, n_bad_rows: int = 0):
        super().__init__(message)
        self.n_bad_rows = n_bad_rows


def check_on_bad_row(on_bad_row: str) -> str:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    return on_bad_row


class BadRows:
    """The bad rows of one pass: with on_bad_row=error the first one raises; with skip they are counted and
    the first few kept for the log, so a skip is never silent."""

    def __init__(self, on_bad_row: str, keep: int = 5):
        self.on_bad_row = check_on_bad_row(on_bad_row)
        self.keep = keep
        self.count = 0
        self.first: list[str] = []

    def add(self, message: str) -> None:
        """One bad row, `message` naming its file, row and reason."""
        if self.on_bad_row == "error":
            raise DataError(message + FIX)
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(message)

    def log(self, where: str, n_rows: int) -> None:
        if self.count:
            logger.warning("%s: skipped %d bad row(s) of %d; first: %s", where, self.count, n_rows,
                           " | ".join(self.first))
