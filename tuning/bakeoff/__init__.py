"""``compare-backends``: one MoE layer's whole expert path per backend (Triton, DeepGEMM, FlashInfer), as vLLM runs it,
checked against a float reference and timed; vLLM's own helper kernels and CUDA ops, gated on their stand-ins."""
