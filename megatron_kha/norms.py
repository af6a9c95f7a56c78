"""LocalNorm: a plain-PyTorch LayerNorm/RMSNorm that also works with sequence parallelism.

Megatron-Core's local fallback (WrappedTorchNorm, used when neither apex nor
Transformer Engine is installed) refuses sequence_parallel. Under SP each TP rank
normalises a different slice of the sequence, so the norm's gradient on a rank is
partial; Megatron's finalize_model_grads sums over TP exactly the params that
carry `sequence_parallel=True`. LocalNorm sets that attribute, nothing more.
"""
import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalNorm:
    """Factory (like WrappedTorchNorm): returns torch.nn.LayerNorm or torch.nn.RMSNorm per config."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused_kwargs):
        if config.layernorm_zero_centered_gamma:
            raise ValueError(
                "layernorm_zero_centered_gamma=True is not supported by the local backend's norm; "
                "allowed: False (or backend='te')"
            )
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(
                f"normalization={config.normalization!r} is not supported by the local backend; "
                "allowed: LayerNorm, RMSNorm"
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
