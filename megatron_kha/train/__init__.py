"""Training entry point (`python -m megatron_kha.train`): Megatron-LM-style args, data, loop, checkpointing."""
