"""Float stand-ins for DeepGEMM's grouped GEMM and FlashInfer's fused MoE, honouring their contracts, so the
bake-off's DeepGEMM and FlashInfer paths (vLLM's own Triton helpers around them) run on the CPU; and CPU stand-ins
for vLLM 0.33's CUDA ops, called by the schemas those ops register (``fake_cuda_ops``)."""

import torch

from tuning.inputs import dequant_blocks


def is_power_of_two(x: torch.Tensor) -> bool:
    bits = x.float().contiguous().view(torch.int32)
    return bool(((bits & 0x7FFFFF) == 0).all())


class FakeDeepGemm:
    """m_grouped_fp8_gemm_nt_contiguous: d[r] = a[r] @ b[expert(r)].T over 1x128 / 128x128 scales; rows of an
    expert from m_indices (-1: padding), or from the prefix-sum layout (expert ends, starts aligned)."""

    __version__ = "fake"

    def __init__(self, alignment: int = 128):
        self.alignment = alignment
        self.calls: list[dict] = []

    def get_mk_alignment_for_contiguous_layout(self):
        return self.alignment

    def set_mk_alignment_for_contiguous_layout(self, value):
        self.alignment = value

    def get_theoretical_mk_alignment_for_contiguous_layout(self, expected_m, groups):
        return 128

    def transform_sf_into_required_layout(self, sf, mn, k, recipe, num_groups, is_sfa, disable_ue8m0_cast):
        assert tuple(recipe) == (1, 128, 128) and num_groups == sf.shape[0] and not is_sfa
        return sf

    def rows(self, layout: torch.Tensor, m_sum: int, psum: bool) -> list[tuple[int, int]]:
        if not psum:
            return [(r, int(e)) for r, e in enumerate(layout.tolist()) if e >= 0]
        out, end = [], 0
        for e, stop in enumerate(layout.tolist()):
            start = -(-end // self.alignment) * self.alignment
            out += [(r, e) for r in range(start, stop)]
            end = stop
        return out

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, d, layout, disable_ue8m0_cast, use_psum_layout=False):
        (aq, a_sf), (bq, b_sf) = a, b
        self.calls.append({"ue8m0": not disable_ue8m0_cast, "psum": use_psum_layout, "align": self.alignment})
        rows = self.rows(layout, d.shape[0], use_psum_layout)
        if not disable_ue8m0_cast:  # padding rows are never read: their scales may be anything
            live = torch.tensor([r for r, _ in rows], dtype=torch.long)
            assert is_power_of_two(a_sf[live]) and is_power_of_two(b_sf), "E8M0 needs power-of-two scales"
        af = aq.float() * a_sf.float().repeat_interleave(128, 1)[:, : aq.shape[1]]
        bf = dequant_blocks(bq, b_sf, (128, 128))
        for r, e in rows:
            d[r] = (af[r] @ bf[e].T).to(d.dtype)


class FakeFlashInfer:
    """cutlass_fused_moe with DeepSeek FP8 blocks: bf16 input quantised per 1x128 inside, w31 = [up; gate]."""

    def __init__(self):
        self.kwargs: dict = {}

    def __call__(self, **kw):
        self.kwargs = kw
        x, ids, wts, out = kw["input"], kw["token_selected_experts"], kw["token_final_scales"], kw["output"]
        s31, s2 = kw["quant_scales"]
        w31 = dequant_blocks(kw["fc1_expert_weights"], s31, (128, 128))
        w2 = dequant_blocks(kw["fc2_expert_weights"], s2, (128, 128))
        local = w2.shape[0]
        first = kw["ep_rank"] * local
        acc = torch.zeros(out.shape, dtype=torch.float32)
        for t in range(x.shape[0]):
            for j in range(ids.shape[1]):
                e = int(ids[t, j]) - first
                if 0 <= e < local:
                    up, gate = (x[t].float() @ w31[e].T).chunk(2)
                    acc[t] += (torch.nn.functional.silu(gate) * up @ w2[e].T) * wts[t, j]
        out.copy_(acc.to(out.dtype))
        return out


def fake_cuda_ops(helpers, calls: list | None = None) -> dict:
    """torch.ops._C / _moe_C as vLLM 0.33 registers them (argument names and order of ``vllm_ops.SCHEMAS``), in
    torch on the CPU; the quantisations through vLLM's Triton kernels (``helpers``), as the stand-in runs them.
    Each call appends the op's name to ``calls``. moe_align_block_size orders an expert's slots backwards, as a
    CUDA kernel's atomics may: the layout differs from the stand-in's only within experts."""
    from tuning.bakeoff import moe_ops

    log = calls if calls is not None else []

    def per_token_group_fp8_quant(input, output_q, output_s, group_size, eps, fp8_min, fp8_max, scale_ue8m0,
                                  dummy_is_scale_transposed, dummy_is_tma_aligned):
        log.append("per_token_group_fp8_quant")
        assert (fp8_min, fp8_max, dummy_is_tma_aligned) == (-448.0, 448.0, False)
        if min(output_s.shape) > 1:  # the flag names the scales' layout
            assert dummy_is_scale_transposed == (output_s.stride(0) == 1)
        moe_ops.group_quant(helpers, input, group_size, use_ue8m0=scale_ue8m0, column_major=dummy_is_scale_transposed,
                            out_q=output_q, out_s=output_s, eps=eps)

    def silu_and_mul(result, input):
        log.append("silu_and_mul")
        d = input.shape[-1] // 2
        result.copy_(torch.nn.functional.silu(input[:, :d].float()) * input[:, d:].float())

    def silu_and_mul_per_block_quant(out, input, scales, group_size, scale_ub=None, is_scale_transposed=False):
        log.append("silu_and_mul_per_block_quant")
        assert scale_ub is None and not is_scale_transposed and out.dtype == moe_ops.FP8
        act = torch.empty(out.shape, dtype=input.dtype)
        moe_ops.silu_and_mul(act, input)
        moe_ops.group_quant(helpers, act, group_size, use_ue8m0=False, out_q=out, out_s=scales)

    def moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids, num_tokens_post_pad,
                             maybe_expert_map, scatter_idx=None):
        log.append("moe_align_block_size")
        assert scatter_idx is None and topk_ids.dtype == torch.int32
        flat = topk_ids.reshape(-1).long()
        numel = flat.numel()
        sorted_token_ids.fill_(numel)
        pos = 0
        for e in range(num_experts):
            local = e if maybe_expert_map is None else int(maybe_expert_map[e])
            if local < 0:  # ignore_invalid_experts: a remote expert's slots take no rows
                continue
            slots = (flat == e).nonzero().flatten().flip(0)
            if slots.numel() == 0:
                continue
            sorted_token_ids[pos:pos + slots.numel()] = slots.to(torch.int32)
            rows = -(-slots.numel() // block_size) * block_size
            experts_ids[pos // block_size:(pos + rows) // block_size] = local
            pos += rows
        num_tokens_post_pad.fill_(pos)

    def moe_sum(input, output, topk_ids=None, expert_map=None):
        log.append("moe_sum")
        x = input.float()
        if expert_map is not None:
            x = x * (expert_map[topk_ids.long()] >= 0)[..., None]
        output.copy_(x.sum(dim=1))

    return {f.__name__: f for f in (per_token_group_fp8_quant, silu_and_mul, silu_and_mul_per_block_quant,
                                    moe_align_block_size, moe_sum)}
