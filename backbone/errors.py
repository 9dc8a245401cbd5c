"""The project's own errors and the scripts' command-line helpers: one error base class, so a CLI can print them as
one line; argparse types; the help formatter that shows every default."""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import math
import os
import sys
import textwrap
from collections.abc import Callable


class ProjectError(ValueError):
    """A problem with the user's input or files, with a message that names it and the fix."""


DEBUG_FLAG = "--debug"
DEBUG_ENV = "ADAPERCEIVER_DEBUG"


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main()``; the user's own input problems end it with one line, not a traceback.

    A ``ProjectError`` (or a ``FileNotFoundError`` / ``PermissionError``) prints ``error: <message>`` on one
    line to stderr and exits with status 2, like argparse's usage errors. ``--debug`` anywhere on the command
    line (taken out of ``sys.argv`` before ``main`` parses it) or ``ADAPERCEIVER_DEBUG=1`` shows the full
    traceback instead. Other exceptions (bugs) always keep their traceback.
    """
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if DEBUG_FLAG in sys.argv[1:]:
        debug = True
        sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != DEBUG_FLAG]
    try:
        main()
    except (ProjectError, FileNotFoundError, PermissionError) as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error, exit status 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers, each >= 1."""
    return [positive_int(v) for v in text.split(",")]


def grid_point(text: str) -> tuple[int, int, float]:
    """argparse type: a configuration ``TOKENS,DEPTH,WIDTH``, e.g. ``4,2,0.25`` (checked against a backbone later)."""
    try:
        tokens, depth, width = (part.strip() for part in text.split(","))
        return int(tokens), int(depth), float(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENS,DEPTH,WIDTH such as 4,2,0.25, got {text!r}") from None


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and infinities are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' ``--help``: the description as written, and every option's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = "%(default)" in text or "default" in text.lower()
        if (shown or not action.option_strings or action.default is argparse.SUPPRESS or action.required
                or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (its first sentence-worth, on one line), by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field, after in itertools.pairwise(body):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[field.target.id] = " ".join(after.value.value.split()).replace("%", "%%")
    return docs
