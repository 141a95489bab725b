"""Tune vLLM's fused-MoE Triton kernel for Step-3.5-Flash and prepare GPU nodes to serve it.

The tuner's modules sit at this level; beside them, ``vllm`` (what vLLM decides at run time), ``serve`` (preflight
and validate-serve), ``bakeoff`` (compare-backends) and ``deepgemm`` (check-deepgemm). docs/design.md maps them.
"""

__version__ = "0.1.0"
