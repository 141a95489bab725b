"""compare-backends' DeepGEMM side: the contiguous grouped layout it builds around the GEMMs.

DeepGEMM itself needs an sm90/sm100 GPU (its run on an H200 is in benchmarks/); here a
float implementation of m_grouped_fp8_gemm_nt_contiguous's contract stands in for it, so
the gather into per-expert aligned blocks and the weighted scatter back are checked
against the float reference of the whole expert computation.
"""

import pytest
import torch

from tuning.backends import DeepGemmMoe
from tuning.vllm_rules import deepgemm_runs
from tuning.models import DEFAULT_MODEL, load_model
from tuning.shapes import parse_layout, shape_for
from tuning.inputs import build_problem, dequant_blocks
from tuning.routing import Routing
from tuning.shapes import MoeShape


class GroupedGemmContract:
    """d[r] = a[r] @ b[m_indices[r]].T for rows with m_indices >= 0, 1x128 / 128x128 scales."""

    def __init__(self, alignment: int = 128):
        self.alignment = alignment
        self.rows_seen = 0

    def get_mk_alignment_for_contiguous_layout(self):
        return self.alignment

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, d, m_indices, disable_ue8m0_cast):
        (aq, a_sf), (bq, b_sf) = a, b
        assert disable_ue8m0_cast and aq.dtype == torch.float8_e4m3fn and d.shape[0] == m_indices.numel()
        assert d.shape[0] % self.alignment == 0
        af = aq.float() * a_sf.repeat_interleave(128, 1)
        bf = dequant_blocks(bq, b_sf, (128, 128))
        for r in (m_indices >= 0).nonzero().squeeze(1).tolist():
            d[r] = (af[r] @ bf[int(m_indices[r])].T).to(d.dtype)
        self.rows_seen += int((m_indices >= 0).sum())


@pytest.mark.parametrize("shape,m", [
    (MoeShape(4, 8, 128, 256, 2, "fp8", (128, 128)), 12),  # expert parallel: half the slots are remote
    (MoeShape(8, 8, 128, 256, 2, "fp8", (128, 128)), 5),
])
def test_grouped_layout_reproduces_the_expert_computation(shape, m):
    p = build_problem(shape, m, Routing(), 0, torch.device("cpu"), torch.bfloat16)
    dg = GroupedGemmContract()
    moe = DeepGemmMoe(dg, p)
    local_slots = int((p.local_ids >= 0).sum())
    assert moe.pairs.numel() == local_slots
    starts = torch.nonzero(moe.m_indices[1:] != moe.m_indices[:-1]).squeeze(1) + 1
    assert all(int(s) % 128 == 0 for s in starts if moe.m_indices[s] >= 0)  # each expert starts aligned
    assert moe.error() < 5e-3
    assert dg.rows_seen == 2 * local_slots  # two GEMMs, padding rows skipped


@pytest.mark.parametrize("layout,n,runs_from", [
    ("TP2", 640, 128),  # without E8M0: DeepGEMM from M=128 (its M alignment) up
    ("DP4+EP", 1280, 128),
    ("TP4", 384, None),  # padded 320 -> 384: N <= 512, Triton at every M without E8M0
    ("TP8", 256, None),
])
def test_where_a_deep_gemm_serve_runs_deepgemm(layout, n, runs_from):
    """vLLM 0.33's TritonOrDeepGemmExperts: DeepGEMM whenever E8M0 is used (the default on sm90 and sm100);
    with VLLM_USE_DEEP_GEMM_E8M0=0 only for aligned M, N, K and N > 512."""
    shape = shape_for(load_model(DEFAULT_MODEL + "-FP8"), parse_layout(layout), "fp8", moe_backend="deep_gemm")
    assert (shape.n, shape.block_shape) == (n, (128, 128))
    ms = (1, 16, 64, 127, 128, 256, 1024, 4096)
    assert all(deepgemm_runs(m, shape.n, shape.k, e8m0=True) for m in ms)
    runs = [m for m in ms if deepgemm_runs(m, shape.n, shape.k, e8m0=False)]
    assert runs == ([] if runs_from is None else [m for m in (128, 256, 1024, 4096) if m >= runs_from])


def test_layout_records_its_alignment():
    p = build_problem(MoeShape(8, 8, 128, 256, 2, "fp8", (128, 128)), 5, Routing(), 0, torch.device("cpu"),
                      torch.bfloat16)
    assert DeepGemmMoe(GroupedGemmContract(alignment=64), p).alignment == 64
