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


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            mods = [node.module] if node.module else [a.name for a in node.names]
            if all(isinstance(p, ast.stmt) for p in [node]) and node.col_offset == 0:  # module-level only
                found |= {m.split(".")[0] for m in mods}
    return found


def test_the_package_imports_form_no_circle():
    graph = {p.stem: _imports(p) for p in (REPO / "tuning").glob("*.py")}
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
    """docs/design.md's table lists every module once, by layer; a module imports (at module level or inside a
    function) only modules of its own layer or of the layers below it."""
    rows = [line.split("|")[1:3] for line in (REPO / "docs" / "design.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| layer |")]
    layer = {module: i for i, (_, cell) in enumerate(rows) for module in re.findall(r"`(\w+)`", cell)}
    modules = {p.stem for p in (REPO / "tuning").glob("*.py")} - {"__init__", "__main__"}
    assert set(layer) == modules, f"missing from the map: {sorted(modules - set(layer))}; " \
                                  f"not modules: {sorted(set(layer) - modules)}"
    up = []
    for module in sorted(modules):
        for node in ast.walk(ast.parse((REPO / "tuning" / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for dep in {m.split(".")[0] for m in ([node.module] if node.module else [a.name for a in node.names])}:
                    if dep in layer and layer[dep] < layer[module]:
                        up.append(f"{module} ({rows[layer[module]][0].strip()}) imports {dep} "
                                  f"({rows[layer[dep]][0].strip()})")
    assert not up, "\n".join(up)
