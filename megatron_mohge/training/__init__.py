"""Training plumbing on megatron.core (CPU mode or GPUs)."""
