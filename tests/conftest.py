"""Shared test setup.

Without a GPU, vLLM's Triton kernels run under Triton's interpreter; the variable must
be set before Triton is first imported, hence here.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = FIXTURES / "tiny-moe" / "config.json"


def vllm_fused_moe_path() -> Path | None:
    """vLLM's fused_moe.py of the installed vLLM, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model_executor/layers/fused_moe/fused_moe.py"
    return path if path.exists() else None


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
