"""What vLLM does, read in its source or asked of its own code: the rules a target release applies at run time
(backend per MoE layer kind, FP8 block refinement or padding, DeepGEMM dispatch, the config lookup), its kernel
source, the serve command and the batch sizes it resolves, the Triton it pins, the measured backend advice, its log
lines. Nothing here imports torch."""
