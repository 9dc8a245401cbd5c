"""Every script's --help gives each option a line of help and, where it has one, its default."""

import argparse
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if not p.stem.startswith("_"))


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's ``main`` builds, caught as it parses (nothing else of ``main`` runs)."""
    caught = {}

    def catch(self, *args, **kwargs):
        caught["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        importlib.import_module(f"experiments.{script}").main([])
    return caught["parser"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_shows_its_default(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    formatter = parser._get_formatter()
    lacking = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._expand_help(action) if action.help else ""
        flag = action.option_strings[0]
        if not text.strip():
            lacking.append(f"{flag}: no help")
        elif not (action.required or action.nargs == 0 or "default" in text.lower()):
            lacking.append(f"{flag}: no default shown")
    assert not lacking, lacking
    parser.format_help()  # renders without a formatting error
