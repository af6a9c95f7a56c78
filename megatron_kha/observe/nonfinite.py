"""check_finite: stop (or skip the step) when the loss or the gradient norm is NaN/inf.

Call it once a step's loss and gradient norm are known, before the parameter update
where the optimizer allows it. Default: raise NonFiniteError naming the step and the
bad value. With skip=True (the `--skip-nonfinite-steps` option) it returns False instead:
the caller skips the optimizer step (and zeroes the gradients), and the step is counted
in `skipped_nonfinite_steps()`. Every rank must take the same decision: pass values that
are already reduced across ranks (Megatron's grad norm is; reduce the loss first).
"""
import math
from typing import List, Optional

SKIP_OPTION = "--skip-nonfinite-steps"
_skipped_steps: List[int] = []


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm of a training step is NaN or infinite."""


def _as_float(value) -> Optional[float]:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def check_finite(loss, grad_norm, step: int, skip: bool = False) -> bool:
    """True when loss and grad_norm (None = not computed) are finite; see the module docstring."""
    values = {"loss": _as_float(loss), "grad_norm": _as_float(grad_norm)}
    bad = [name for name, v in values.items() if v is not None and not math.isfinite(v)]
    if not bad:
        return True
    if skip:
        _skipped_steps.append(step)
        return False
    shown = ", ".join(f"{name}={v}" for name, v in values.items())
    raise NonFiniteError(
        f"non-finite {' and '.join(bad)} at step {step} ({shown}). Training stopped; resume from "
        f"the last checkpoint. To skip such steps instead (no "
        f"optimizer update, the step is counted), rerun with {SKIP_OPTION}; if it keeps happening, lower the "
        f"learning rate or enable gradient clipping."
    )


def skipped_nonfinite_steps() -> List[int]:
    """The steps skipped by check_finite(skip=True) in this process, in order."""
    return list(_skipped_steps)


def reset_skipped_nonfinite_steps() -> None:
    _skipped_steps.clear()
