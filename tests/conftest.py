"""Shared test setup.

Without a GPU, vLLM's Triton kernels run under Triton's interpreter; the variable must
be set before Triton is first imported, hence here.
"""

import os
from pathlib import Path

import pytest
import torch

from tuning.cli import main
from tuning.vllm.kernel import installed_fused_moe

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = FIXTURES / "tiny-moe" / "config.json"


def vllm_fused_moe_path() -> Path | None:
    """vLLM's fused_moe.py of the installed vLLM, found without importing vLLM."""
    return installed_fused_moe()


@pytest.fixture(scope="session")
def fused_moe_py() -> Path:
    path = vllm_fused_moe_path()
    if path is None:
        pytest.skip("vLLM is not installed: its fused_moe.py is the kernel under test")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def provenance_for(config_path: Path, configs: dict, *, triton: str = "3.8.0", vllm: str = "0.33.0",
                   kernel_sha256: str = "0" * 64, layouts: tuple[str, ...] = ()):  # (): the shape's layout
    """A valid sidecar record for ``config_path`` holding ``configs`` (default = tuned, speedup 1)."""
    from tuning.provenance import BatchRow, Provenance, RunInfo
    from tuning.shapes import FILE_NAME, MoeShape

    m = FILE_NAME.match(Path(config_path).name)
    block = (int(m.group(5)), int(m.group(6))) if m.group(5) else None
    shape = MoeShape(int(m.group(1)), 288, int(m.group(2)), 4096, 8, "fp8" if m.group(4) else "bf16", block)
    run = RunInfo(gpu_name="NVIDIA H200", device_name=m.group(3), driver="580.159.04", count=1, cuda="13.0",
                  torch="2.11.0", triton=triton, python="3.12.3", vllm=vllm, kernel="vLLM fused_moe_kernel",
                  kernel_sha256=kernel_sha256)
    rows = tuple(BatchRow(m=bs, default=c, default_us=10.0, tuned=c, tuned_us=10.0, speedup=1.0, roofline_us=5.0,
                          default_pct_roofline=50.0, tuned_pct_roofline=50.0, bound="memory")
                 for bs, c in sorted(configs.items()))
    layouts = layouts or ((f"TP{288 // shape.num_experts}+EP",) if shape.expert_parallel else ("TP1",))  # as a run
    return Provenance(file=Path(config_path).name, shape=shape, layouts=layouts, gpu_key="H200", run=run,
                      search={"strategy": "guided", "routing": "uniform", "seed": 0, "scope": "gemms"},
                      started="2026-11-30T00:00:00Z", finished="2026-11-30T00:01:00Z", tuning_seconds=60.0, rows=rows)


@pytest.fixture
def tune(tmp_path, monkeypatch, capsys):
    """Run ``tune-moe`` in-process in an empty folder with no nvidia-smi on PATH; returns (rc, stdout, stderr)."""
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
        out, err = capsys.readouterr()
        assert not (tmp_path / "kernels_configs").exists()
        return rc, out, err

    return run
