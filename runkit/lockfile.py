"""The lock file, `requirements-lock.txt`: the exact versions of every package the test suite passed with
(`make lock` writes it with `pip freeze`; `make test` and `make demo` install from it).

`python -m runkit.lockfile LOCK < freeze.txt` prints how an environment differs from the lock (what
`make test-latest` shows before it runs the suite).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """`name==version` lines of a requirements text -> {canonical name: version}; other lines are refused."""
    pins = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"lock line {number} ({raw!r}) is not an exact pin NAME==VERSION; regenerate "
                             "with `make lock`")
        pins[canonical(name.strip())] = version.strip()
    return pins


def drift(lock: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per package whose version differs between the lock and an environment, sorted by name."""
    lines = []
    for name in sorted(set(lock) | set(current)):
        old, new = lock.get(name), current.get(name)
        if old != new:
            lines.append(f"{name}: {old or 'absent'} in the lock, {new or 'absent'} here")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m runkit.lockfile LOCK < freeze.txt", file=sys.stderr)
        return 2
    lines = drift(read_pins(Path(argv[0]).read_text()), read_pins(sys.stdin.read()))
    print(f"{len(lines)} package(s) differ from {argv[0]}:" if lines
          else f"the environment matches {argv[0]}")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
