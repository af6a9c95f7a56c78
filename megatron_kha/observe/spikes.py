"""LossSpikeDetector: flags training-loss spikes against robust rolling statistics.

The last `window` non-spike losses are summarised robustly, allowing for the trend of a
decaying (or rising) loss curve:
    slope      median of (l[i + n//2] - l[i]) / (step[i + n//2] - step[i])   (half-window pairs)
    detrended  l[i] - slope * step[i]   for every loss in the window
    expected   slope * step + median of the last `min_history` detrended losses
               (recent losses carried to this step along the trend: little lag, little bias
               from the curvature of a decaying curve)
    scale      1.4826 * the largest of three MADs (each estimates a Gaussian noise's std):
               of the detrended window, of its successive differences (/ sqrt 2), and
               of the last 4 * window prediction errors
               (loss - expected) of non-spike steps, which also counts the error of
               `expected` itself and is steadier than 50 points; widened by
               sqrt(window / n) while only n < window losses are known; at least
               max(rel_floor * |expected|, abs_floor), so a perfectly flat curve does not
               flag tiny noise.
A loss is a spike when it exceeds  expected + threshold * scale.  Non-finite losses are
spikes too. Spikes are recorded in `.spikes` and kept out of the history, so one spike
does not raise the bar for the next. Nothing is flagged before `min_history` losses.

Level shift: if `min_history` consecutive losses are all flagged, the loss has moved to a
new level (e.g. a data-mix change); the history restarts from those losses so the
detector does not flag every step from then on (they stay in `.spikes`).
"""
import math
from collections import deque
from typing import List, Tuple

MAD_TO_STD = 1.4826


def _median(values) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class LossSpikeDetector:
    """update(step, loss) -> True when this loss is a spike; `.spikes` is [(step, loss), ...]."""

    def __init__(self, window: int = 50, threshold: float = 4.0, min_history: int = 10,
                 rel_floor: float = 1e-3, abs_floor: float = 1e-6):
        if window < 4 or min_history < 4 or min_history > window:
            raise ValueError(f"need 4 <= min_history ({min_history}) <= window ({window})")
        self.window, self.threshold, self.min_history = window, threshold, min_history
        self.rel_floor, self.abs_floor = rel_floor, abs_floor
        self.history = deque(maxlen=window)  # (step, loss) of recent non-spike losses
        self.errors = deque(maxlen=4 * window)  # loss - expected of recent non-spike losses
        self.spikes: List[Tuple[int, float]] = []
        self._consecutive: List[Tuple[int, float]] = []

    def expected_and_scale(self, step: int) -> Tuple[float, float]:
        """Robust expected loss at `step` and the noise scale (needs min_history losses)."""
        steps, losses = zip(*self.history)
        half = len(losses) // 2
        slope = _median((losses[i + half] - losses[i]) / max(steps[i + half] - steps[i], 1)
                        for i in range(len(losses) - half))
        detrended = [l - slope * s for s, l in self.history]  # the losses seen from step 0
        center = _median(detrended)
        successive = [b - a for a, b in zip(detrended, detrended[1:])]
        diff_center = _median(successive)
        spread = max(_median(abs(d - center) for d in detrended),
                     _median(abs(d - diff_center) for d in successive) / math.sqrt(2.0))
        if len(self.errors) >= self.min_history:
            spread = max(spread, _median(abs(e) for e in self.errors))
        expected = _median(detrended[-self.min_history:]) + slope * step
        scale = MAD_TO_STD * spread * math.sqrt(self.window / len(losses))
        return expected, max(scale, self.rel_floor * abs(expected), self.abs_floor)

    def bound(self, step: int) -> float:
        """The loss above which a loss at `step` is a spike (inf while the history is short)."""
        if len(self.history) < self.min_history:
            return math.inf
        expected, scale = self.expected_and_scale(step)
        return expected + self.threshold * scale

    def update(self, step: int, loss) -> bool:
        loss = float(loss)
        expected = scale = None
        if len(self.history) >= self.min_history:
            expected, scale = self.expected_and_scale(step)
        if math.isfinite(loss) and (expected is None or loss <= expected + self.threshold * scale):
            self.history.append((step, loss))
            if expected is not None:
                self.errors.append(loss - expected)
            self._consecutive.clear()
            return False
        self.spikes.append((step, loss))
        if math.isfinite(loss):
            self._consecutive.append((step, loss))
            if len(self._consecutive) >= self.min_history:  # a new level, not a spike
                self.history.clear()
                self.history.extend(self._consecutive)
                self.errors.clear()
                self._consecutive.clear()
        return True
