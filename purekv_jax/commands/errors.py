"""How the ``purekv`` commands report errors: one line on stderr, and an exit status per kind of error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class ArgumentsError(ValueError):
    """A command-line value that cannot work (raised before any weights are read)."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a multi-line message joined with spaces)."""
    return " ".join(str(err).split("\n")).strip() or type(err).__name__


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report bad arguments in one line (``PROG: error: ...; see PROG --help``), exit 2."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def run_guarded(prog: str, body: Callable[[], int], interrupted: str = "interrupted",
                on_error: Callable[[int, str], None] | None = None) -> int:
    """``body()`` -> exit status. User errors (``ValueError`` / ``OSError``: bad files, arguments, prompts,
    checkpoints) print ``PROG: error: ...`` as one line on stderr and return 2, Ctrl-C prints
    ``PROG: <interrupted>`` and returns 130, an XLA
    runtime error (e.g. out of device memory) prints one line and returns 1; anything else is a bug and
    keeps its traceback. ``on_error(status, line)`` is called with each printed line (a multi-process job
    hands it to the other processes)."""

    def report(status: int, line: str) -> int:
        print(line, file=sys.stderr, flush=True)
        if on_error is not None:
            on_error(status, line)
        return status

    try:
        return body()
    except KeyboardInterrupt:
        return report(130, f"{prog}: {interrupted}")
    except (ValueError, OSError) as err:
        return report(2, f"{prog}: error: {one_line(err)}")
    except RuntimeError as err:
        if "Xla" not in type(err).__name__ and "Jax" not in type(err).__name__:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return report(1, f"{prog}: device error: {first}; try a smaller --max-pixels / --fps or a lower --budget")
