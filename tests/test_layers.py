"""The packages are layers: each may import only the layers below it, and nothing imports the CLI.

Every import counts, module-level and inside functions (a lazy import is still a dependency).
In the spirit of Polygraphy's tests/mod/test_dependencies.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("pipeline", "engines", "calibration")

# Layer -> the layers it may import (besides itself). Listed bottom-up.
_CORE = {"pipeline.core", "pipeline"}  # `pipeline` itself: the package's __version__ only
ALLOWED: dict[str, set[str]] = {
    "pipeline.core": set(),
    "pipeline": set(),
    "calibration": _CORE,
    "engines": _CORE | {"calibration"},
    "pipeline.config": _CORE,
    "pipeline.models": _CORE | {"pipeline.config", "engines", "calibration"},
    "pipeline.parity": _CORE | {"pipeline.config", "pipeline.models", "engines", "calibration"},
    "pipeline.reports": _CORE | {"pipeline.config", "pipeline.parity"},
}
ALLOWED["pipeline.stages"] = set(ALLOWED) | {"pipeline.reports"}
ALLOWED["pipeline.build"] = ALLOWED["pipeline.stages"] | {"pipeline.stages"}
ALLOWED["pipeline.deploy"] = ALLOWED["pipeline.build"] | {"pipeline.build"}
ALLOWED["pipeline.bench"] = ALLOWED["pipeline.deploy"] | {"pipeline.deploy"}
ALLOWED["pipeline.matrix"] = ALLOWED["pipeline.build"] | {"pipeline.build"}
ALLOWED["pipeline.api"] = ALLOWED["pipeline.bench"]
ALLOWED["pipeline.cli"] = ALLOWED["pipeline.bench"] | {"pipeline.bench", "pipeline.api", "pipeline.matrix"}
ALLOWED["pipeline.__main__"] = {"pipeline.cli"}
# The package's lazy re-export of the Python API, imported inside __getattr__ on first use (`pipeline.build`
# is the build subpackage made callable as the API's build(); see pipeline/__init__.py).
ALLOWED["pipeline"] = {"pipeline.api", "pipeline.build"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names if name.split(".")[0] in TOP_PACKAGES][:1]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] in TOP_PACKAGES]
    return found


def layering_violations(root: Path) -> list[str]:
    violations = []
    for package in TOP_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = layer_of(module_name(path, root))
            if source not in ALLOWED:
                violations.append(f"{path.relative_to(root)}: package '{source}' has no layer in tests/test_layers.py")
                continue
            for line, target in imports_of(path):
                target_layer = layer_of(target)
                if target_layer != source and target_layer not in ALLOWED[source]:
                    violations.append(f"{path.relative_to(root)}:{line}: {source} imports {target} ({target_layer})")
    return sorted(violations)


def test_packages_import_only_the_layers_below_them() -> None:
    assert layering_violations(ROOT) == []


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: an engine that imports the build runner, and a stage that imports the CLI."""
    for package in TOP_PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "engines" / "rogue.py").write_text("from pipeline.build.runner import run_build\n")
    (tmp_path / "pipeline" / "stages").mkdir()
    (tmp_path / "pipeline" / "stages" / "rogue.py").write_text("def f():\n    import pipeline.cli.main\n")
    assert layering_violations(tmp_path) == [
        "engines/rogue.py:1: engines imports pipeline.build.runner (pipeline.build)",
        "pipeline/stages/rogue.py:2: pipeline.stages imports pipeline.cli.main (pipeline.cli)",
    ]


@pytest.mark.parametrize("package", TOP_PACKAGES)
def test_no_module_imports_the_cli(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in (ROOT / package).rglob("*.py")
        if layer_of(module_name(path, ROOT)) not in ("pipeline.cli", "pipeline.__main__")
        for line, target in imports_of(path)
        if layer_of(target) == "pipeline.cli"
    ]
    assert offenders == []
