"""Layering rules (README "Architecture"), checked on the import statements of every module:
the engine runs on a bare GPU box (no ray, no redis), routing never loads model code, and the
serving layer sees only the engine's public face (`swift_engine`'s top level)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(package: str, root: Path = ROOT) -> list[tuple[str, str]]:
    """(file, imported module) for every absolute import in the package."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.relative_to(root).as_posix(), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((path.relative_to(root).as_posix(), node.module))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("package, forbidden", [
    ("swift_engine", {"ray", "redis", "routing", "deployments", "benchmarks"}),
    ("routing", {"swift_engine", "torch", "transformers", "deployments", "benchmarks"}),
    ("deployments", {"benchmarks"}),
])
def test_no_upward_or_foreign_imports(package, forbidden):
    bad = [(f, m) for f, m in imports(package) if top(m) in forbidden]
    assert not bad, f"{package} must not import {sorted(forbidden)}: {bad}"


def test_serving_layer_uses_only_the_engines_public_face():
    """`swift_engine` itself, or its evaluation entry points (`swift_engine.eval`, for the CLI)."""
    bad = [(f, m) for f, m in imports("deployments")
           if top(m) == "swift_engine" and m != "swift_engine" and not m.startswith("swift_engine.eval")]
    assert not bad, f"deployments/ imports swift_engine internals (use `from swift_engine import ...`): {bad}"


def test_the_rule_sees_a_violation(tmp_path):
    """The checker itself: an internal import in a scratch package is reported."""
    pkg = tmp_path / "deployments"
    pkg.mkdir()
    (pkg / "x.py").write_text("from swift_engine.engine.core import EngineCore\nimport swift_engine\n")
    assert imports("deployments", tmp_path) == [("deployments/x.py", "swift_engine.engine.core"),
                                      ("deployments/x.py", "swift_engine")]
