"""megatron_kha.observe: training observability for KHA / MEA runs (no extra dependencies needed).

    spikes.LossSpikeDetector(window=50, threshold=4.0, min_history=10)
        .update(step, loss) -> bool, .spikes [(step, loss)]: robust (median/MAD) loss-spike flags.
    nonfinite.check_finite(loss, grad_norm, step, skip=False) -> bool
        raises NonFiniteError (or, with skip, returns False and counts: skipped_nonfinite_steps()).
    head_metrics.knocking_identity_distance(model) -> {"layer0/knocking_v.weight": float, ...}
    head_metrics.HeadOutputSimilarity(model): .enabled, .compute() -> {"layer0": float}, .close()
    heatmap.write_heatmap_png(matrix, path, title=None); write_model_heatmaps(model, out_dir, step)
    telemetry.GpuTelemetry(): .available, .sample() -> {"gpu0/power_w": ..., ...} ({} without GPU)
    tensorboard.ScalarLogger(log_dir, enabled=True): .add_scalars(step, dict), .close(), .disabled_reason
    progress.ProgressBar(total, enabled=True): .update(n=1), .close()  (percent, it/s, ETA on stderr)

The shared helper head_mixing_matrices.head_mixing_matrices(model) lists every knocking /
composition matrix with its init pattern, labelled by global layer index.
"""
from megatron_kha.observe.head_metrics import HeadOutputSimilarity, knocking_identity_distance
from megatron_kha.observe.heatmap import write_heatmap_png, write_model_heatmaps
from megatron_kha.observe.nonfinite import NonFiniteError, check_finite, skipped_nonfinite_steps
from megatron_kha.observe.progress import ProgressBar
from megatron_kha.observe.spikes import LossSpikeDetector
from megatron_kha.observe.telemetry import GpuTelemetry
from megatron_kha.observe.tensorboard import ScalarLogger

__all__ = [
    "LossSpikeDetector", "check_finite", "NonFiniteError", "skipped_nonfinite_steps",
    "knocking_identity_distance", "HeadOutputSimilarity", "write_heatmap_png", "write_model_heatmaps",
    "GpuTelemetry", "ScalarLogger", "ProgressBar",
]
