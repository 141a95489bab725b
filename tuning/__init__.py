"""Tune vLLM's fused-MoE Triton kernel for Step-3.5-Flash and prepare GPU nodes to serve it."""

__version__ = "0.1.0"
