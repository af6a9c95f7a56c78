"""Pool tasks for tests/test_train.py (module-level so they pickle by reference)."""
import os

import torch

from megatron_kha.train import checkpointing
from megatron_kha.train.args import parse_args
from megatron_kha.train.loop import build_model
from tests.parallel_tasks import init_parallel


def interrupted_save_task(directory):
    """Save iteration 1; make the save of iteration 2 die after writing part of it; check what load sees."""
    init_parallel(tp=2)
    os.environ["WORLD_SIZE"] = str(torch.distributed.get_world_size())  # what torchrun would set
    args = parse_args(["--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "32",
                       "--attention-variant", "kha"])
    model, ddp, optimizer, scheduler, _ = build_model(args, vocab_size=128)
    torch.manual_seed(0)
    for p in ddp.parameters():  # one optimizer step, so Adam has state to save (as in training)
        p.main_grad.copy_(torch.randn_like(p.main_grad))
    optimizer.step()
    checkpointing.save_checkpoint(directory, 1, model, optimizer, scheduler, 4, {})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    real_save = checkpointing.dist_checkpointing.save

    def dying_save(state, path, *a, **k):
        open(os.path.join(path, "partial.bin"), "wb").write(b"\0" * 128)  # something hit the disk
        raise RuntimeError("killed mid-save")

    checkpointing.dist_checkpointing.save = dying_save
    try:
        checkpointing.save_checkpoint(directory, 2, model, optimizer, scheduler, 8, {})
    except RuntimeError:
        pass
    finally:
        checkpointing.dist_checkpointing.save = real_save
    torch.distributed.barrier()
    result = {
        "tracker_after_failed_save": checkpointing.latest_iteration(directory),
        "incomplete_left": os.path.isdir(checkpointing.checkpoint_dir(directory, 2) + ".incomplete"),
        "final_of_failed_exists": os.path.exists(checkpointing.checkpoint_dir(directory, 2)),
    }
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    iteration, consumed, _ = checkpointing.load_checkpoint(directory, model, optimizer, scheduler)
    result["loaded_iteration"] = iteration
    result["weights_restored"] = all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    checkpointing.save_checkpoint(directory, 2, model, optimizer, scheduler, 8, {})
    result["tracker_after_retry"] = checkpointing.latest_iteration(directory)
    result["incomplete_after_retry"] = os.path.exists(checkpointing.checkpoint_dir(directory, 2) + ".incomplete")
    return result
