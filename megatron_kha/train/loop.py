"""The pretraining loop: Megatron-Core all the way down.

GPTModel from our block spec, Megatron DDP, the Megatron optimizer (distributed optimizer on
GPU), OptimizerParamScheduler (linear warmup, cosine decay to --min-lr), the
forward/backward schedule for the pipeline layout, dist-checkpointing for save/resume.
Logs follow Megatron-LM's per-iteration format.
"""
import math
import os
import time
from datetime import datetime

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_kha.cpu_backend import enable_cpu_backend
from megatron_kha.world import free_port
from megatron_kha.specs import get_gpt_decoder_block_spec
from megatron_kha.train.args import model_config
from megatron_kha.train.checkpointing import load_checkpoint, save_checkpoint
from megatron_kha.train.data import MicroBatchIterator, build_datasets
from megatron_kha.train.observers import Observers
from megatron_kha.train.tokenizer import load_tokenizer


def init_distributed(args) -> None:
    """torchrun (or a single process) -> process group, Megatron parallel state, seeds."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        enable_cpu_backend()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        backend = "gloo"
    torch.distributed.init_process_group(backend)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )
    # As Megatron-LM: a different default seed per pipeline stage, model-parallel seeds from the tracker.
    torch.manual_seed(args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def build_model(args, vocab_size: int):
    use_gpu = torch.cuda.is_available()
    config = model_config(
        args,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_cpu_initialization=not use_gpu,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_decoder_block_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    if use_gpu:
        model.cuda(torch.cuda.current_device())
    wrapped = Float16Module(config, model) if args.bf16 else model
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=use_gpu, grad_reduce_in_fp32=True),
        module=wrapped,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=use_gpu),
        [ddp],
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.train_iters, lr_decay_style="cosine",
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    return model, ddp, optimizer, scheduler, config


def _to_device(batch: dict) -> dict:
    if not torch.cuda.is_available():
        return batch
    return {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def forward_step(data_iterator, model):
    batch = _to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    loss_mask = batch["loss_mask"].float()

    def loss_func(per_token_loss):
        loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
        # clone: Megatron's schedule divides `loss` in place by the number of micro-batches
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def run_schedule(ddp, iterator, args, num_microbatches, forward_only):
    """One global batch through Megatron's schedule; returns the DP-averaged loss (all ranks)."""
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterator, model=[ddp],
        num_microbatches=num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only,
    )
    loss = torch.zeros(1, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        loss += sum(o["lm loss"].double().cpu() for o in outputs) / num_microbatches
    device_loss = loss.cuda() if torch.cuda.is_available() else loss
    torch.distributed.all_reduce(device_loss, group=parallel_state.get_data_parallel_group())
    last_stage = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(device_loss, src=last_stage, group=parallel_state.get_pipeline_model_parallel_group())
    return device_loss.item() / parallel_state.get_data_parallel_world_size()


def train(args) -> dict:
    init_distributed(args)
    rank0 = torch.distributed.get_rank() == 0
    log = print if rank0 else (lambda *a, **k: None)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = int(math.ceil(tokenizer.vocab_size / 128) * 128)  # Megatron-LM pads the vocab like this
    model, ddp, optimizer, scheduler, config = build_model(args, vocab_size)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp_size)
    eval_runs = args.train_iters // args.eval_interval + 1
    train_ds, valid_ds = build_datasets(
        args.data_path, args.seq_length, args.seed, args.train_iters * args.global_batch_size,
        eval_runs * args.eval_iters * args.global_batch_size, tokenizer, split=args.split, cache_dir=args.data_cache_dir,
    )
    iteration, consumed = 0, 0
    if args.load:
        iteration, consumed, _ = load_checkpoint(args.load, model, optimizer, scheduler)
        log(f" loaded checkpoint from {args.load} at iteration {iteration} (consumed samples: {consumed})")
    train_iter = MicroBatchIterator(train_ds, args.micro_batch_size, dp_rank, dp_size, consumed)
    observers = Observers(args, model, rank0, start_iteration=iteration)
    common = {"args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}}
    log(f" training {args.attention_variant} for {args.train_iters} iterations: world {torch.distributed.get_world_size()}, "
        f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} EP={args.expert_model_parallel_size} "
        f"DP={dp_size}, global batch {args.global_batch_size}, vocab {vocab_size}")
    result = {"losses": {}, "valid": {}}
    tokens_per_iter = args.global_batch_size * args.seq_length
    start = time.time()
    while iteration < args.train_iters:
        iteration += 1
        t0 = time.time()
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        observers.before_step(iteration)
        loss = run_schedule(ddp, train_iter, args, num_microbatches, forward_only=False)
        finalize_model_grads([ddp])
        # Checked before the optimizer touches the weights: a NaN step either stops the run or is skipped.
        grad_norm = float("nan")
        if observers.check_finite(loss, gradients_finite(ddp), iteration):
            update_ok, grad_norm, _ = optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if update_ok:
                scheduler.step(increment=1)
        consumed += args.global_batch_size
        elapsed = time.time() - t0
        result["losses"][iteration] = loss
        observers.after_step(iteration, loss, grad_norm, scheduler.get_lr(optimizer.param_groups[0]), elapsed, tokens_per_iter)
        if iteration % args.log_interval == 0 or iteration == 1:
            log(f" [{datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{args.train_iters:8d} | "
                f"consumed samples: {consumed:12d} | elapsed time per iteration (ms): {elapsed * 1000:.1f} | "
                f"learning rate: {scheduler.get_lr(optimizer.param_groups[0]):.6E} | global batch size: "
                f"{args.global_batch_size:5d} | lm loss: {loss:.6E} | grad norm: {grad_norm:.3f} | "
                f"number of skipped iterations: {observers.skipped:3d} | tokens/s: {tokens_per_iter / elapsed:.0f}"
                + observers.log_suffix(), flush=True)
        if args.eval_interval and (iteration % args.eval_interval == 0 or iteration == args.train_iters) and args.eval_iters:
            result["valid"][iteration] = evaluate(ddp, valid_ds, args, dp_rank, dp_size, num_microbatches, iteration)
            log(f" validation loss at iteration {iteration} | lm loss value: {result['valid'][iteration]:.6E} | "
                f"lm loss PPL: {math.exp(min(20.0, result['valid'][iteration])):.6E}", flush=True)
            observers.validation(iteration, result["valid"][iteration])
        if args.save and ((args.save_interval and iteration % args.save_interval == 0) or iteration == args.train_iters):
            path = save_checkpoint(args.save, iteration, model, optimizer, scheduler, consumed, common)
            log(f" saved checkpoint at iteration {iteration} to {path}", flush=True)
        if args.exit_interval and iteration % args.exit_interval == 0:
            log(f" exiting at iteration {iteration} (--exit-interval {args.exit_interval})", flush=True)
            break
    observers.close()
    result["tokens_per_s"] = tokens_per_iter * len(result["losses"]) / max(1e-9, time.time() - start)
    torch.distributed.barrier()
    return result


def evaluate(ddp, valid_ds, args, dp_rank, dp_size, num_microbatches, iteration) -> float:
    """Mean validation loss over --eval-iters global batches; the same batches at every evaluation."""
    ddp.eval()
    iterator = MicroBatchIterator(valid_ds, args.micro_batch_size, dp_rank, dp_size, 0)
    with torch.no_grad():
        losses = [run_schedule(ddp, iterator, args, num_microbatches, forward_only=True) for _ in range(args.eval_iters)]
    ddp.train()
    return sum(losses) / len(losses)


def gradients_finite(ddp) -> bool:
    """True when no gradient on any model-parallel rank is NaN/Inf (one all-reduce of a flag)."""
    bad = torch.zeros(1)
    for p in ddp.parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None and not torch.isfinite(g).all():
            bad += 1
            break
    bad = bad.cuda() if torch.cuda.is_available() else bad
    torch.distributed.all_reduce(bad, group=parallel_state.get_model_parallel_group())
    return bad.item() == 0
