"""The project's own errors: one base class, so a CLI can print them as one line."""

from __future__ import annotations

import os
import sys
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
