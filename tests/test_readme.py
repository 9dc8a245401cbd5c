"""The README's Python example runs as written, on the shipped digits backbone and policy."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def test_readme_python_example_runs(capsys, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 2, "the README has one Python example and the serving client"
    assert len(blocks[0].strip().splitlines()) <= 15
    monkeypatch.chdir(ROOT)
    exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102 (the project's own README)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 and all("MFLOPs" in line and "config" in line for line in lines[:8])
    assert lines[8].startswith("certified price at 5%: lambda"), "the tolerance maps to a certified price"


def test_readme_client_is_the_one_the_serving_tests_run():
    # tests/test_serve_app.py runs serving/client_example.py against a server it starts
    client = python_blocks()[1]
    assert client.strip() and client.strip() in (ROOT / "serving" / "client_example.py").read_text()
