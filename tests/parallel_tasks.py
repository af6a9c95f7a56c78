"""Task functions run on every rank of the gloo pool (module-level, so they pickle by reference).

Pattern: build the TP=PP=EP=1 reference on every rank, keep its full weights, logits and
gradients; re-initialise Megatron's parallel state for the layout under test; give each rank
its slice of the same weights; return the largest differences for the test to assert on.
Gradients always go through Megatron DDP + finalize_model_grads, as in real training.
"""
import os

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from tests.gpt_factory import SEQ, batch, build_gpt, full_params, global_name, grad_of, load_full_, local_slice, randomize_, tiny_config


def init_parallel(tp=1, pp=1, ep=1, seed=0):
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def wrap_ddp(model, config):
    return DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(), module=model)


def _forward_step(data_iterator, model):
    tokens, labels, pos, mask = next(data_iterator)
    output = model(tokens, pos, mask, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def train_step(ddp_model, config, batches):
    """One forward+backward over `batches` (microbatches) with Megatron's schedule; returns losses."""
    ddp_model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(batches),
        model=[ddp_model],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=batches[0][0].shape[0],
        forward_only=False,
    )
    finalize_model_grads([ddp_model])
    return [l["lm loss"] for l in losses]


def run_layout(cfg_kwargs, batches, tp=1, pp=1, ep=1, sp=False, full=None, seed=1234, layer_spec=False):
    """Build the model for a layout, load `full` weights (or keep its own), run one train step.

    Returns (model, losses, logits of the first batch or None off the last stage).
    """
    init_parallel(tp, pp, ep)
    extra = {"pipeline_dtype": torch.float32} if pp > 1 else {}
    config = tiny_config(sequence_parallel=sp, **extra, **cfg_kwargs)
    model = build_gpt(config, seed=seed, layer_spec=layer_spec)
    if full is None:
        randomize_(model, seed=seed)
    else:
        load_full_(model, full)
    logits = None
    if pp == 1:
        tokens, _, pos, mask = batches[0]
        with torch.no_grad():
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(tokens, pos, mask))
    ddp = wrap_ddp(model, config)
    losses = train_step(ddp, config, batches)
    model.grad_norm = megatron_grad_norm(ddp)
    return model, losses, logits


def megatron_grad_norm(ddp) -> float:
    """The grad norm Megatron's optimizer clips with (replicated params counted once)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.0, clip_grad=1.0), [ddp])
    optimizer.prepare_grads()
    return float(optimizer.get_grad_norm())


def compare_to_reference(model, ref_grads, ref_logits, logits, losses, ref_losses):
    """Largest |difference| for logits, losses and every parameter's gradient."""
    out = {"logits": 0.0, "loss": 0.0, "grads": {}, "ref_grad_max": 0.0, "grad_norm": model.grad_norm}
    if logits is not None:
        out["logits"] = (logits - ref_logits).abs().max().item()
    if losses:
        out["loss"] = max(abs(a.item() - b.item()) for a, b in zip(losses, ref_losses))
    for name, p in model.named_parameters():
        ref = local_slice(p, ref_grads[global_name(model, name)])
        out["grads"][name] = (grad_of(p) - ref).abs().max().item()
        out["ref_grad_max"] = max(out["ref_grad_max"], ref.abs().max().item())
    return out


def reference(cfg_kwargs, batches):
    """TP=PP=EP=1 run on this rank: full weights, gradients, logits and losses."""
    model, losses, logits = run_layout(cfg_kwargs, batches)
    full = full_params(model)
    grads = {n: grad_of(p) for n, p in model.named_parameters()}
    return full, grads, logits, losses, model.grad_norm


def parity_task(cfg_kwargs, tp=1, pp=1, ep=1, sp=False, per_rank_data=False, layer_spec=False):
    """Compare a parallel layout against TP=PP=EP=1 on the same weights and data."""
    rank = torch.distributed.get_rank()
    data_seed = 100 + (rank if per_rank_data else 0)
    batches = [batch(data_seed + i) for i in range(2)]
    full, ref_grads, ref_logits, ref_losses, ref_norm = reference(cfg_kwargs, batches)
    model, losses, logits = run_layout(cfg_kwargs, batches, tp=tp, pp=pp, ep=ep, sp=sp, full=full, layer_spec=layer_spec)
    result = compare_to_reference(model, ref_grads, ref_logits, logits, losses, ref_losses)
    result["ref_grad_norm"] = ref_norm
    result["replicated"] = sorted(n for n, _ in model.named_parameters() if is_replicated_extra(n))
    result["last_stage"] = parallel_state.is_pipeline_last_stage()
    return result


def is_replicated_extra(name: str) -> bool:
    """Our TP-replicated parameters: knocking maps (KHA) and composition matrices (MEA)."""
    return ".knocking_" in name or name.endswith("_composition")


def gather_full_params(model) -> dict:
    """Full tensors of a TP-sharded model (all-gather along each param's partition_dim)."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = group.size()
    full = {}
    for name, p in model.named_parameters():
        t = p.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            parts = [torch.empty_like(t) for _ in range(size)]
            torch.distributed.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=p.partition_dim)
        full[global_name(model, name)] = t
    return full


def checkpoint_task(path, cfg_kwargs):
    """Save at TP=2; load at TP=1 and at PP=2; report mismatches and who writes each replicated param."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    init_parallel(tp=2)
    model = build_gpt(tiny_config(**cfg_kwargs))
    randomize_(model, seed=9)
    full = gather_full_params(model)
    sharded = model.sharded_state_dict()
    writers = {
        f"{sh.key}@{sh.global_offset}": int(is_main_replica(sh.replica_id))
        for sh in nested_values(sharded)
        if isinstance(sh, ShardedTensor) and is_replicated_extra(sh.key)
    }
    if torch.distributed.get_rank() == 0:
        os.makedirs(path)  # dist_checkpointing.save wants an existing, empty directory
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, path)
    result = {"writers": writers, "loaded": {}}
    for layout in ("tp1", "pp2"):
        pp = 2 if layout == "pp2" else 1
        init_parallel(pp=pp)
        extra = {"pipeline_dtype": torch.float32} if pp > 1 else {}
        fresh = build_gpt(tiny_config(**cfg_kwargs, **extra), seed=4321)
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), path))
        mismatched = [
            n for n, p in fresh.named_parameters()
            if not torch.equal(p.detach(), local_slice(p, full[global_name(fresh, n)]))
        ]
        result["loaded"][layout] = {"mismatched": mismatched, "count": len(list(fresh.parameters()))}
    return result


def optimizer_steps_task(cfg_kwargs, steps=20):
    """Train `steps` Adam steps at TP=2 + SP; return the knocking params and their init."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    init_parallel(tp=2)
    config = tiny_config(sequence_parallel=True, **cfg_kwargs)
    model = build_gpt(config)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if is_replicated_extra(n)}
    ddp = wrap_ddp(model, config)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0, params_dtype=torch.float32),
        [ddp],
    )
    losses, norms = [], []
    for step in range(steps):
        losses += train_step(ddp, config, [batch(1000 + step)])
        ok, grad_norm, _ = optimizer.step()
        assert ok
        norms.append(float(grad_norm))
    final = {n: p.detach().clone() for n, p in model.named_parameters() if is_replicated_extra(n)}
    return {"init": init, "final": final, "losses": [l.item() for l in losses], "grad_norms": norms}
