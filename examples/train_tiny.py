"""Train a small GPT with and without Knocking-Heads Attention and print both loss curves.

Launch under torchrun (examples/quickstart.sh does): every rank runs this file. On a
machine without CUDA it uses gloo and megatron_kha.enable_cpu_backend(). Everything is
Megatron-Core: GPTModel from our block spec, Megatron DDP, the Megatron optimizer and
LR scheduler, and the forward/backward schedule. Data: byte-level tokens of the running
interpreter's standard-library sources (real text every machine has), split 90/10.
"""
import argparse
import os
import sysconfig
import time
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kha import KHAConfig, enable_cpu_backend, get_gpt_decoder_block_spec


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kha-targets", default="v")
    p.add_argument("--kha-type", default="linear", choices=["linear", "mlp"])
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    for name in ("steps", "log_interval", "tensor_model_parallel_size", "num_layers", "hidden_size", "seq_length", "micro_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def stdlib_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """The first `limit` bytes of the stdlib's .py files, in a fixed (sorted) order."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def sample_batches(data: torch.Tensor, seq: int, mbs: int, seed: int):
    """Endless random windows; the same seed on every rank, so TP ranks see the same batch."""
    g = torch.Generator().manual_seed(seed)
    position_ids = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (mbs,), generator=g)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:], position_ids, mask


def forward_step(data_iterator, model):
    tokens, labels, position_ids, mask = next(data_iterator)
    output = model(tokens, position_ids, mask, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def build(args, variant: str):
    config = KHAConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=4 * args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.tensor_model_parallel_size > 1,
        normalization="RMSNorm",
        qk_layernorm=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        attention_variant=variant,
        kha_targets=args.kha_targets,
        kha_type=args.kha_type,
    )
    torch.manual_seed(args.seed)  # same initial weights for both variants (knocking maps start at I)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_decoder_block_spec(config),
        vocab_size=256,
        max_sequence_length=args.seq_length,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(), module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.lr / 10, weight_decay=0.1, clip_grad=1.0), [ddp]
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.lr / 10,
        lr_warmup_steps=max(1, args.steps // 10),
        lr_decay_steps=args.steps,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=args.steps,
        wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def run_schedule(ddp, batches, seq, mbs, forward_only):
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[ddp],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def train(args, variant, train_data, valid_data, log):
    ddp, optimizer, scheduler = build(args, variant)
    batches = sample_batches(train_data, args.seq_length, args.micro_batch_size, args.seed)
    losses, start = [], time.time()
    for step in range(1, args.steps + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = run_schedule(ddp, batches, args.seq_length, args.micro_batch_size, forward_only=False)
        finalize_model_grads([ddp])
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        loss = out[0]["lm loss"].item()
        losses.append(loss)
        tokens_per_s = step * args.micro_batch_size * args.seq_length / (time.time() - start)
        if step % args.log_interval == 0 or step == 1:
            log(f" [{variant}] iteration {step:4d}/{args.steps:4d} | lm loss: {loss:.4f} | grad norm: "
                f"{float(grad_norm):.3f} | lr: {scheduler.get_lr(optimizer.param_groups[0]):.2e} | tokens/s: {tokens_per_s:.0f}")
    ddp.eval()
    valid = sample_batches(valid_data, args.seq_length, args.micro_batch_size, seed=7)
    with torch.no_grad():
        val = [run_schedule(ddp, valid, args.seq_length, args.micro_batch_size, True)[0]["lm loss"].item() for _ in range(8)]
    return losses, sum(val) / len(val)


def main():
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        enable_cpu_backend()
        torch.set_num_threads(1)
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    rank0 = torch.distributed.get_rank() == 0
    log = print if rank0 else (lambda *_: None)

    data = stdlib_bytes()
    split = int(0.9 * len(data))
    log(f"data: {len(data)} bytes of stdlib source ({split} train / {len(data) - split} valid), "
        f"world {torch.distributed.get_world_size()}, TP={args.tensor_model_parallel_size}, "
        f"backend {'nccl' if use_cuda else 'gloo (CPU)'}")
    results = {v: train(args, v, data[:split], data[split:], log) for v in ("baseline", "kha")}

    log(f"\nper-step training loss (KHA: targets={args.kha_targets}, type={args.kha_type})")
    log(f"{'step':>5} {'baseline':>10} {'kha':>10}")
    for step, (b, k) in enumerate(zip(results["baseline"][0], results["kha"][0]), start=1):
        log(f"{step:5d} {b:10.4f} {k:10.4f}")
    log(f"\nvalidation loss: baseline {results['baseline'][1]:.4f} | kha {results['kha'][1]:.4f}")
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
