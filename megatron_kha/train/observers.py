"""What the training loop reports besides the loss: one object wiring megatron_kha.observe.

Per iteration: loss-spike detection, NaN/Inf policy, a JSONL metrics record, tensorboard
scalars and the progress bar (main rank). Every --metrics-interval iterations: how far
each knocking/composition matrix is from its init, the cosine similarity between heads'
outputs (this rank's heads), PNG heatmaps of the matrices and GPU telemetry.
"""
import json
import os

from megatron.core import parallel_state

from megatron_kha.observe.head_metrics import HeadOutputSimilarity, knocking_identity_distance
from megatron_kha.observe.heatmap import write_model_heatmaps
from megatron_kha.observe.nonfinite import check_finite
from megatron_kha.observe.progress import ProgressBar
from megatron_kha.observe.spikes import LossSpikeDetector
from megatron_kha.observe.telemetry import GpuTelemetry
from megatron_kha.observe.tensorboard import ScalarLogger


class Observers:
    def __init__(self, args, model, rank0: bool, start_iteration: int = 0):
        self.args, self.model, self.rank0 = args, model, rank0
        self.spikes = LossSpikeDetector()
        self.skipped = 0
        self.telemetry = GpuTelemetry(device_indices=[int(os.environ.get("LOCAL_RANK", "0"))])
        # Each pipeline stage holds different layers: one writer per stage (TP and DP rank 0).
        self.stage_writer = (parallel_state.get_tensor_model_parallel_rank() == 0
                             and parallel_state.get_data_parallel_rank() == 0)
        self.similarity = HeadOutputSimilarity(model)
        self.tensorboard = ScalarLogger(args.tensorboard_dir, enabled=rank0) if args.tensorboard_dir else None
        self.progress = ProgressBar(args.train_iters, enabled=rank0 and not args.no_progress_bar, initial=start_iteration)
        self.heatmap_dir = args.heatmap_dir or (os.path.join(args.save, "heatmaps") if args.save else None)

    def _metrics_due(self, iteration: int) -> bool:
        return iteration % self.args.metrics_interval == 0

    def before_step(self, iteration: int) -> None:
        self.similarity.enabled = self._metrics_due(iteration)  # capture head outputs on this step only

    def check_finite(self, loss: float, gradients_finite: bool, iteration: int) -> bool:
        """False: skip this optimizer step (--skip-nonfinite-steps); raises NonFiniteError otherwise."""
        ok = check_finite(loss, None if gradients_finite else float("nan"), iteration, skip=self.args.skip_nonfinite_steps)
        self.skipped += not ok
        return ok

    def after_step(self, iteration, loss, grad_norm, lr, elapsed_s, tokens) -> None:
        spike = self.spikes.update(iteration, loss)
        if spike and self.rank0:
            print(f" loss spike at iteration {iteration}: {loss:.4f} (spikes so far: {len(self.spikes.spikes)})", flush=True)
        record = {"iteration": iteration, "lm_loss": loss, "grad_norm": grad_norm, "lr": lr,
                  "elapsed_s": elapsed_s, "tokens_per_s": tokens / max(elapsed_s, 1e-9), "spike": spike}
        if self._metrics_due(iteration):
            record.update(self._head_metrics(iteration))
        self.similarity.enabled = False
        self._write(record)
        self.scalars(iteration, {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))})
        self.progress.update()

    def validation(self, iteration: int, loss: float) -> None:
        self._write({"iteration": iteration, "valid_lm_loss": loss})
        self.scalars(iteration, {"valid/lm loss": loss})

    def _write(self, record: dict) -> None:
        if self.rank0 and self.args.metrics_file:
            with open(self.args.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _head_metrics(self, iteration: int) -> dict:
        out = {f"identity_distance/{k}": v for k, v in knocking_identity_distance(self.model).items()}
        out.update({f"head_cosine/{k}": v for k, v in self.similarity.compute().items()})
        out.update({f"gpu/{k}": v for k, v in self.telemetry.sample().items()})
        if self.stage_writer and self.heatmap_dir:
            write_model_heatmaps(self.model, self.heatmap_dir, iteration)
        return out

    def scalars(self, iteration: int, values: dict) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalars(iteration, values)

    def log_suffix(self) -> str:
        return f" | loss spikes: {len(self.spikes.spikes)}"

    def close(self) -> None:
        self.progress.close()
        self.similarity.close()
        self.telemetry.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
