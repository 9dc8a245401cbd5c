"""The packages form layers: backbone -> envs -> policy -> inference -> serving -> evaluation -> experiments, and none imports upward."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("backbone", "envs", "policy", "inference", "serving", "evaluation", "experiments")


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages that ``path`` imports (at any depth of the file, type-checking imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def test_no_package_imports_a_layer_above_it():
    violations = []
    for rank, package in enumerate(LAYERS):
        files = sorted((ROOT / package).glob("*.py"))
        assert files, package
        for path in files:
            for imported in imported_packages(path):
                if LAYERS.index(imported) > rank:
                    violations.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not violations, violations


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from evaluation.report import build_report\nimport policy.train\n")
    assert imported_packages(bad) == {"evaluation", "policy"}
