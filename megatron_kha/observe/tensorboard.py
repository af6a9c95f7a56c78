"""ScalarLogger: scalars to TensorBoard when the `tensorboard` package is installed, else a no-op.

    logger = ScalarLogger(log_dir, enabled=is_logging_rank)
    logger.add_scalars(step, {"train/loss": 2.3, "gpu0/power_w": 310.0})
    logger.close()

Without tensorboard (or with enabled=False) every call does nothing; the reason is in
`.disabled_reason` and, for a missing package, printed once to stderr at construction.
"""
import sys
from typing import Mapping, Optional


def _summary_writer_class():
    """(SummaryWriter class, None) or (None, why it cannot be used)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as error:  # torch raises ImportError when tensorboard is missing
        return None, f"TensorBoard logging disabled: {error} (pip install tensorboard to enable it)"
    return SummaryWriter, None


class ScalarLogger:
    def __init__(self, log_dir: str, enabled: bool = True):
        self.log_dir = log_dir
        self.writer = None
        self.disabled_reason: Optional[str] = None
        if not enabled:
            self.disabled_reason = "disabled on this rank (enabled=False)"
            return
        writer_class, self.disabled_reason = _summary_writer_class()
        if writer_class is None:
            print(self.disabled_reason, file=sys.stderr)
            return
        self.writer = writer_class(log_dir=log_dir)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One point per tag at `step` (tensors are converted with float())."""
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
