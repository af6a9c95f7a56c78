"""Training checkpoints: model, optimizer, LR schedule, RNG and data position, resumable exactly.

Layout under --save (Megatron-LM's names):
    iter_0000040/                          a complete torch_dist dist-checkpoint
        rng/rank_00000.pt ...              each rank's RNG states (torch.load(weights_only=True))
    latest_checkpointed_iteration.txt      the newest COMPLETE checkpoint
A save writes `iter_XXXXXXX.incomplete/`, renames it only after every rank has finished,
and then rank 0 replaces the tracker file atomically (os.replace). A save killed half-way
leaves an `.incomplete` directory that nothing reads; the tracker still names the
previous checkpoint, so it never becomes the latest.
"""
import os
import shutil

import torch
from megatron.core import dist_checkpointing, tensor_parallel

TRACKER = "latest_checkpointed_iteration.txt"


def _barrier():
    torch.distributed.barrier()


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, value in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = value
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def latest_iteration(directory: str):
    """Iteration named by the tracker, or None when there is no complete checkpoint."""
    path = os.path.join(directory, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"--load: {path} is corrupt (expected an iteration number, found {text[:40]!r})")
    return int(text)


def checkpoint_dir(directory: str, iteration: int) -> str:
    return os.path.join(directory, f"iter_{iteration:07d}")


def save_checkpoint(directory, iteration, model, optimizer, scheduler, consumed_samples, common: dict) -> str:
    """Collective: every rank calls it. `common` holds plain data (args, config) stored once."""
    rank = torch.distributed.get_rank()
    final = checkpoint_dir(directory, iteration)
    partial = final + ".incomplete"
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier killed save
        os.makedirs(partial)
    _barrier()
    model_state = model.sharded_state_dict()
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        **common,
    }
    dist_checkpointing.save(state, partial)
    os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
    _barrier()  # every rank's shards and RNG are on disk
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
        tmp_tracker = os.path.join(directory, TRACKER + ".tmp")
        with open(tmp_tracker, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_tracker, os.path.join(directory, TRACKER))
    _barrier()
    return final


def load_checkpoint(directory, model, optimizer, scheduler):
    """Restore everything saved by save_checkpoint; returns (iteration, consumed_samples, common)."""
    iteration = latest_iteration(directory)
    if iteration is None:
        raise FileNotFoundError(f"--load {directory}: no complete checkpoint ({TRACKER} is missing)")
    path = checkpoint_dir(directory, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load: {TRACKER} names iteration {iteration} but {path} does not exist")
    model_state = model.sharded_state_dict()
    state = {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True)}
    loaded = dist_checkpointing.load(state, path)
    model.load_state_dict(loaded.pop("model"))
    optimizer.load_state_dict(loaded.pop("optimizer"))
    scheduler.load_state_dict(loaded.pop("scheduler"))
    rank = torch.distributed.get_rank()
    rng_file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if not os.path.isfile(rng_file):
        raise FileNotFoundError(f"--load: {rng_file} is missing (was the checkpoint saved with a different world size?)")
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return loaded.pop("iteration"), loaded.pop("consumed_samples"), loaded
