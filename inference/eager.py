"""The eager path: the programs run as written, operator by operator. The reference every other path equals."""

from __future__ import annotations

from inference.runner import Program, Runner


class EagerRunner(Runner):
    """Runs each program's function directly; nothing is built or cached."""

    name = "eager"

    def run(self, program: Program):
        return program.fn(*program.args)
