"""The README's Python example runs as written, on the shipped digits backbone and policy."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(capsys, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the README has one Python example"
    assert len(blocks[0].strip().splitlines()) <= 15
    monkeypatch.chdir(ROOT)
    exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102 (the project's own README)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 and all("MFLOPs" in line and "config" in line for line in lines[:8])
    assert lines[8].startswith("certified price at 5%: lambda"), "the tolerance maps to a certified price"
