"""A small, self-describing checkpoint convention for the conversion tools (one process, TP=PP=1).

A checkpoint directory is a Megatron `dist_checkpointing` (torch_dist) checkpoint of
    {"model": model.sharded_state_dict(), "kha_config": <plain dict>}
where "kha_config" (common state, read back with `dist_checkpointing.load_common_state_dict`)
holds what is needed to rebuild the GPTModel: the KHAConfig fields in CONFIG_FIELDS plus
the model-level GPTModel arguments in MODEL_FIELDS, and the activation and params dtype
by name. Loading builds the model from that dict, then loads the sharded tensors strictly
(a missing or mis-shaped tensor fails).

Saving writes into a temporary sibling directory and renames it at the end, so an
interrupted save never leaves a half-written checkpoint under the final name; an existing
output is replaced only with force=True.

Needs torch.distributed initialised (`megatron_kha.world.ensure_single_process_world` makes one).
Megatron's torch_dist writer starts a "spawn" multiprocessing manager on the first save, so a
script that saves must keep its work under `if __name__ == "__main__":`.
"""
import os
from typing import Tuple

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core.activations import squared_relu
from megatron.core.models.gpt import GPTModel

from megatron_kha import KHAConfig, get_gpt_decoder_block_spec
from megatron_kha.convert.atomic_dir import atomic_directory

CONFIG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "layernorm_epsilon", "qk_layernorm", "add_bias_linear",
    "add_qkv_bias", "gated_linear_unit", "rotary_interleaved", "attention_variant", "kha_targets",
    "kha_type", "kha_init", "mea_virtual_kv_heads", "mea_head_norm",
)
MODEL_FIELDS = (
    "vocab_size", "max_sequence_length", "position_embedding_type", "rotary_percent", "rotary_base",
    "share_embeddings_and_output_weights",
)
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "squared_relu": squared_relu}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Runtime settings for a CPU, single-process rebuild (not properties of the checkpoint).
_RUNTIME = dict(
    use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1, sequence_parallel=False,
)


def model_config_dict(model: GPTModel) -> dict:
    """The "kha_config" dict of a GPTModel built with megatron_kha's specs."""
    config = model.config
    if config.num_moe_experts:
        raise ValueError("num_moe_experts is set: MoE models are not covered by this checkpoint convention")
    if config.tensor_model_parallel_size != 1 or config.pipeline_model_parallel_size != 1:
        raise ValueError("save from a TP=1, PP=1 model (this convention is for single-process tools)")
    names = {fn: name for name, fn in ACTIVATIONS.items()}
    if config.activation_func not in names:
        raise ValueError(f"activation_func={config.activation_func!r} unknown; allowed: {', '.join(ACTIVATIONS)}")
    dtypes = {v: k for k, v in DTYPES.items()}
    out = {name: getattr(config, name) for name in CONFIG_FIELDS}
    out.update({name: getattr(model, name) for name in MODEL_FIELDS})
    out["activation"] = names[config.activation_func]
    out["params_dtype"] = dtypes[config.params_dtype]
    return out


def build_model(config_dict: dict, seed: int = 0) -> Tuple[GPTModel, KHAConfig]:
    """A TP=PP=1 GPTModel (local specs) from a "kha_config" dict; unknown keys fail."""
    unknown = sorted(set(config_dict) - set(CONFIG_FIELDS) - set(MODEL_FIELDS) - {"activation", "params_dtype"})
    if unknown:
        raise ValueError(f"kha_config has unknown keys {unknown}; allowed: {CONFIG_FIELDS + MODEL_FIELDS}")
    kwargs = {name: config_dict[name] for name in CONFIG_FIELDS if name in config_dict}
    activation = config_dict.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"kha_config activation={activation!r} unknown; allowed: {', '.join(ACTIVATIONS)}")
    dtype = config_dict.get("params_dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"kha_config params_dtype={dtype!r} unknown; allowed: {', '.join(DTYPES)}")
    config = KHAConfig(**kwargs, **_RUNTIME, activation_func=ACTIVATIONS[activation], params_dtype=DTYPES[dtype],
                       bf16=dtype == "bfloat16", fp16=dtype == "float16")
    model_kwargs = {name: config_dict[name] for name in MODEL_FIELDS if name in config_dict}
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_decoder_block_spec(config), **model_kwargs)
    return model, config


def save_model_checkpoint(model: GPTModel, config_dict: dict, path: str, force: bool = False) -> str:
    """Write `model` + `config_dict` to `path` (temporary sibling, then rename). Returns the path."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{path} exists; refusing to overwrite it without force=True")
    with atomic_directory(path) as tmp:
        dist_checkpointing.save({"model": model.sharded_state_dict(), "kha_config": dict(config_dict)}, tmp)
    return path


def load_config(path: str) -> dict:
    """The "kha_config" dict of a checkpoint written by save_model_checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as err:  # noqa: BLE001 - re-raised with the convention named
        raise ValueError(f"{path} is not a dist_checkpointing checkpoint: {err}") from err
    if not isinstance(common, dict) or not isinstance(common.get("kha_config"), dict):
        raise ValueError(f"{path} has no 'kha_config' in its common state (not written by save_model_checkpoint)")
    return dict(common["kha_config"])


def load_model_checkpoint(path: str) -> Tuple[GPTModel, dict]:
    """(model with the checkpoint's weights, its "kha_config" dict)."""
    config_dict = load_config(path)
    model, _ = build_model(config_dict)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"], strict=True)
    return model, config_dict
