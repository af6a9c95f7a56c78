"""Checkpoint conversions for megatron_kha models (plain tensors in, plain tensors out; thin CLIs in tools/)."""
