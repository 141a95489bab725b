"""The code's shape: lint clean (pyflakes, line length, positional-argument limit), the commands that need no
GPU import no torch, and the package's import graph has no circle."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed (pip install -e '.[test]')")
    run = subprocess.run([ruff, "check", "--output-format", "concise", "tuning", "tests", "benchmarks"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


TORCH_FREE = [
    ["--gpu", "H200", "--dtype", "fp8", "--dry-run"],
    ["validate-serve", "--layout", "TP4", "--dtype", "bf16", "--gpu", "H200", "--print-command"],
    ["validate-serve", "--layout", "DP4+EP", "--dtype", "bf16", "--gpu", "H200", "--reduced", "--ab",
     "--measure-moe-share", "--print-command"],
    ["preflight", "--gpu", "H200", "--", "vllm", "serve", "stepfun-ai/Step-3.5-Flash", "--tensor-parallel-size", "4"],
]


@pytest.mark.parametrize("argv", TORCH_FREE, ids=["dry-run", "validate-serve", "validate-serve-reduced-ab", "preflight"])
def test_commands_without_a_gpu_import_no_torch(argv, tmp_path):
    """They run on machines without torch; anything they ask of vLLM runs in a subprocess."""
    code = ("import sys, runpy\n"
            "from tuning.cli import main\n"
            f"rc = main({argv!r})\n"
            "heavy = sorted(m for m in ('torch', 'triton', 'ray', 'vllm') if m in sys.modules)\n"
            "print('IMPORTED', heavy)\n"
            "sys.exit(rc)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert "IMPORTED []" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


PACKAGE = REPO / "tuning"


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name under ``tuning`` (``shapes``, ``vllm.rules``)."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")
            if p.name not in {"__init__.py", "__main__.py"}}


def _imports(name: str, path: Path, *, module_level: bool) -> set[str]:
    """The package's modules that ``name`` imports with a relative import (at module level only, if asked)."""
    modules = _modules()
    here = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0 or (module_level and node.col_offset):
            continue
        base = here[:len(here) - (node.level - 1)]
        target = base + (node.module.split(".") if node.module else [])
        if ".".join(target) in modules:
            found.add(".".join(target))
        else:  # ``from .pkg import module, ...``
            found |= {".".join([*target, a.name]) for a in node.names} & set(modules)
    return found


def test_the_package_imports_form_no_circle():
    graph = {name: _imports(name, path, module_level=True) for name, path in _modules().items()}
    assert graph["vllm.rules"] >= {"shapes", "vllm.source"}  # the resolution reaches into and out of a subpackage
    seen, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen or node not in graph:
            return
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()
        seen.add(node)

    for module in sorted(graph):
        visit(module)


def test_imports_go_down_the_design_map():
    """docs/design.md's table lists every module once, by layer (by its dotted name under ``tuning``); a module
    imports (at module level or inside a function) only modules of its own layer or of the layers below it."""
    rows = [line.split("|")[1:3] for line in (REPO / "docs" / "design.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| layer |")]
    layer = {module: i for i, (_, cell) in enumerate(rows) for module in re.findall(r"`([\w.]+)`", cell)}
    modules = _modules()
    assert set(layer) == set(modules), f"missing from the map: {sorted(set(modules) - set(layer))}; " \
                                       f"not modules: {sorted(set(layer) - set(modules))}"
    up = []
    for module, path in sorted(modules.items()):
        for dep in sorted(_imports(module, path, module_level=False)):
            if layer[dep] < layer[module]:
                up.append(f"{module} ({rows[layer[module]][0].strip()}) imports {dep} "
                          f"({rows[layer[dep]][0].strip()})")
    assert not up, "\n".join(up)
