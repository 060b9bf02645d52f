"""Every third-party package that first-party code imports is declared in `pyproject.toml`.

A fresh virtual environment has only what `pyproject.toml` names: an import of a package that some other package
happens to bring on the developer's machine passes there and fails on the user's.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY_ROOTS = ("trl_flow", "reward_funcs", "benchmarks")
FIRST_PARTY = {*FIRST_PARTY_ROOTS, "tests"}
#: Optional backends: import name -> the extra that must declare it. Every other import must be a core dependency.
OPTIONAL_IMPORTS = {
    "rapidocr_onnxruntime": "ocr",
    "deepspeed": "deepspeed",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "imageio": "video",
    "imageio_ffmpeg": "video",
}
#: Import names whose distribution is not installed here (optional extras), so metadata cannot map them.
KNOWN_DISTRIBUTIONS = {"rapidocr_onnxruntime": "rapidocr-onnxruntime", "PIL": "pillow", "yaml": "pyyaml"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.split(r"[<>=!~\[;@ ]", requirement.strip(), maxsplit=1)[0])


def declared_distributions(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(core dependencies, {extra: dependencies}) of a pyproject file, as canonical distribution names."""
    project = tomllib.loads(pyproject.read_text())["project"]
    core = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {
        extra: {_requirement_name(r) for r in requirements}
        for extra, requirements in project.get("optional-dependencies", {}).items()
    }
    return core, extras


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a module (module level, in functions, in try blocks)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in FIRST_PARTY}


@functools.cache
def _installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions_of(import_name: str) -> set[str]:
    installed = _installed_distributions().get(import_name)
    if installed:
        return {_canonical(dist) for dist in installed}
    if import_name in KNOWN_DISTRIBUTIONS:
        return {KNOWN_DISTRIBUTIONS[import_name]}
    return {_canonical(import_name)}


def undeclared_imports(roots: list[Path], pyproject: Path) -> list[str]:
    """One line per import that `pyproject` does not declare where it should (core, or the backend's extra)."""
    core, extras = declared_distributions(pyproject)
    problems = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for name in sorted(third_party_imports(path)):
                dists = _distributions_of(name)
                extra = OPTIONAL_IMPORTS.get(name)
                if extra is None and not dists & core:
                    problems.append(f"{path}: imports {name!r} ({', '.join(sorted(dists))}), not a core dependency")
                elif extra is not None and not dists & extras.get(extra, set()):
                    problems.append(f"{path}: imports {name!r}, which the extra [{extra}] does not declare")
    return problems


def test_first_party_code_imports_only_declared_packages():
    problems = undeclared_imports([ROOT / root for root in FIRST_PARTY_ROOTS], ROOT / "pyproject.toml")
    assert not problems, "\n".join(problems)


def _project(tmp_path: Path, dependencies: list[str], extras: dict[str, list[str]]) -> Path:
    lines = ["[project]", 'name = "x"', f"dependencies = {dependencies!r}", "[project.optional-dependencies]"]
    lines += [f"{extra} = {requirements!r}" for extra, requirements in extras.items()]
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("\n".join(lines) + "\n")
    return pyproject


def test_an_undeclared_import_is_reported(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "reward.py").write_text("import numpy\n\n\ndef f():\n    import scipy.ndimage\n")
    declared = _project(tmp_path, ["numpy", "scipy>=1"], {})
    assert undeclared_imports([package], declared) == []
    without_scipy = _project(tmp_path, ["numpy"], {"other": ["scipy"]})
    problems = undeclared_imports([package], without_scipy)
    assert len(problems) == 1 and "'scipy'" in problems[0] and "reward.py" in problems[0]


def test_an_optional_backend_must_be_in_its_extra(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "ocr.py").write_text("def f():\n    from rapidocr_onnxruntime import RapidOCR\n")
    assert undeclared_imports([package], _project(tmp_path, [], {"ocr": ["rapidocr-onnxruntime>=1.4"]})) == []
    problems = undeclared_imports([package], _project(tmp_path, ["rapidocr-onnxruntime"], {"ocr": []}))
    assert len(problems) == 1 and "[ocr]" in problems[0]
