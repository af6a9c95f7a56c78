"""megatron_kha.observe: spike detection, non-finite guard, head metrics, heatmaps, telemetry, logging."""
import io
import math
import os
import random
import struct
import sys
import types
import zlib

import pytest
import torch

from megatron_kha.observe import (
    GpuTelemetry, HeadOutputSimilarity, LossSpikeDetector, NonFiniteError, ProgressBar, ScalarLogger,
    check_finite, knocking_identity_distance, skipped_nonfinite_steps, write_heatmap_png, write_model_heatmaps,
)
from megatron_kha.observe.nonfinite import reset_skipped_nonfinite_steps
from tests.gpt_factory import SEQ, batch, build_gpt, randomize_, tiny_config
from tests.single_rank import ensure_single_rank


# --- loss spikes -------------------------------------------------------------------------------
def _flagged(losses, **kwargs):
    detector = LossSpikeDetector(**kwargs)
    flagged = [step for step, loss in enumerate(losses) if detector.update(step, loss)]
    assert flagged == [step for step, _ in detector.spikes]
    return flagged, detector


def _smooth_curve(steps=1000, seed=0):
    rng = random.Random(seed)
    return [2.0 + 8.0 * math.exp(-step / 300) + rng.gauss(0.0, 0.02) for step in range(steps)]


def test_spike_detector_flags_exactly_the_planted_spikes():
    losses = _smooth_curve()
    planted = [150, 500, 820]
    for step in planted:
        losses[step] += 0.15  # 7.5 sigma of the noise
    flagged, detector = _flagged(losses)
    assert flagged == planted
    assert all(loss == losses[step] for step, loss in detector.spikes)
    assert all(loss not in detector.history for _, loss in detector.spikes)


def test_spike_detector_quiet_on_smooth_and_flat_curves():
    assert _flagged(_smooth_curve(seed=1))[0] == []
    assert _flagged([3.0] * 300)[0] == []
    flat_with_rounding_noise = [3.0 + 1e-5 * ((-1) ** step) for step in range(300)]
    assert _flagged(flat_with_rounding_noise)[0] == []
    flagged, _ = _flagged([3.0] * 100 + [3.5] + [3.0] * 10)
    assert flagged == [100]


def test_spike_detector_nonfinite_and_level_shift():
    flagged, _ = _flagged([2.0] * 20 + [float("nan")] + [2.0] * 5)
    assert flagged == [20]
    # A permanent jump is flagged for min_history steps, then becomes the new normal.
    flagged, detector = _flagged([2.0] * 30 + [5.0] * 30, min_history=10)
    assert flagged == list(range(30, 40))
    assert not detector.update(100, 5.0)


# --- non-finite guard --------------------------------------------------------------------------
def test_check_finite_raises_with_step_and_option():
    assert check_finite(2.5, 1.0, step=3)
    assert check_finite(torch.tensor(2.5), None, step=4)
    with pytest.raises(NonFiniteError) as info:
        check_finite(float("nan"), 1.0, step=1234)
    message = str(info.value)
    assert "1234" in message and "loss" in message and "--skip-nonfinite-steps" in message
    with pytest.raises(NonFiniteError, match="grad_norm"):
        check_finite(1.0, torch.tensor(float("inf")), step=7)


def test_check_finite_skip_counts_and_continues():
    reset_skipped_nonfinite_steps()
    assert check_finite(float("inf"), 1.0, step=10, skip=True) is False
    assert check_finite(1.0, 1.0, step=11, skip=True) is True
    assert check_finite(1.0, float("nan"), step=12, skip=True) is False
    assert skipped_nonfinite_steps() == [10, 12]
    reset_skipped_nonfinite_steps()
    assert skipped_nonfinite_steps() == []


# --- head metrics ------------------------------------------------------------------------------
TINY_VARIANTS = {
    "kha_linear_qkv": dict(attention_variant="kha", kha_targets="qkv"),
    "kha_mlp": dict(attention_variant="kha", kha_type="mlp"),
    "mea_grouped": dict(attention_variant="mea", num_query_groups=4, mea_virtual_kv_heads=2),
}
EXPECTED_MATRICES = {
    "kha_linear_qkv": ["knocking_q.weight", "knocking_k.weight", "knocking_v.weight"],
    "kha_mlp": ["knocking_v.up_weight", "knocking_v.gate_weight", "knocking_v.down_weight"],
    "mea_grouped": ["key_composition", "value_composition"],
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_identity_distance_zero_at_init_and_positive_after_training(variant):
    ensure_single_rank()
    model = build_gpt(tiny_config(**TINY_VARIANTS[variant]))
    distances = knocking_identity_distance(model)
    expected = sorted(f"layer{i}/{name}" for i in range(2) for name in EXPECTED_MATRICES[variant])
    assert sorted(distances) == expected
    assert all(d == 0.0 for d in distances.values()), distances
    randomize_(model, seed=3)
    assert all(d > 1e-3 for d in knocking_identity_distance(model).values())


def test_identity_distance_empty_for_baseline():
    ensure_single_rank()
    assert knocking_identity_distance(build_gpt(tiny_config())) == {}


def test_head_similarity_on_tiny_model_is_a_cosine_per_layer():
    ensure_single_rank()
    model = build_gpt(tiny_config(attention_variant="kha"))
    randomize_(model, seed=5)
    similarity = HeadOutputSimilarity(model)
    assert similarity.layers == 2
    tokens, _, position_ids, mask = batch(seed=1)
    with torch.no_grad():
        model(tokens, position_ids, mask)  # not enabled: nothing captured
        assert similarity.compute() == {}
        similarity.enabled = True
        model(tokens, position_ids, mask)
    values = similarity.compute()
    assert sorted(values) == ["layer0", "layer1"]
    assert all(-1.0 <= v <= 1.0 and math.isfinite(v) for v in values.values())
    assert similarity.compute() == {}  # cleared
    similarity.close()
    with torch.no_grad():
        model(tokens, position_ids, mask)
    assert similarity.compute() == {}  # hooks removed


class _FakeCoreAttention(torch.nn.Module):
    """Core attention stand-in: [s, b, heads * d] built from one head, optionally sign-flipped."""

    def __init__(self, heads, signs):
        super().__init__()
        self.heads, self.signs = heads, torch.tensor(signs, dtype=torch.float32)

    def forward(self, x):
        return (x.unsqueeze(-2) * self.signs[:, None]).flatten(-2)


def _fake_model(signs, head_dim=8):
    attention = torch.nn.Module()
    attention.core_attention = _FakeCoreAttention(len(signs), signs)
    attention.config = types.SimpleNamespace(kv_channels=head_dim)
    attention.layer_number = 1
    layer = torch.nn.Module()
    layer.self_attention = attention
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([layer])
    return model, attention


@pytest.mark.parametrize("signs,expected", [([1, 1, 1, 1], 1.0), ([1, -1], -1.0), ([1, 1, -1, -1], -1 / 3)])
def test_head_similarity_of_equal_and_opposite_heads(signs, expected):
    model, attention = _fake_model(signs)
    similarity = HeadOutputSimilarity(model)
    similarity.enabled = True
    attention.core_attention(torch.randn(SEQ, 2, 8))
    attention.core_attention(torch.randn(3, 1, 8))
    assert similarity.compute() == {"layer0": pytest.approx(expected, abs=1e-6)}
    similarity.close()


# --- heatmaps ----------------------------------------------------------------------------------
def _read_png(path):
    """(width, height, decompressed IDAT, {tEXt key: value}); checks signature, chunk CRCs, IEND."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, interlace) == (8, 2, 0)
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    texts = dict(body.split(b"\x00", 1) for kind, body in chunks if kind == b"tEXt")
    return width, height, pixels, texts


def test_heatmap_png_is_valid_with_diverging_colours(tmp_path):
    matrix = torch.tensor([[1.0, 0.0, -1.0], [0.5, float("nan"), -0.25]])
    path = write_heatmap_png(matrix, str(tmp_path / "sub" / "m.png"), title="layer0/knocking_v.weight", cell_px=4)
    width, height, pixels, texts = _read_png(path)
    assert (width, height) == (12, 8)
    assert len(pixels) == height * (1 + 3 * width)
    assert texts[b"Title"] == b"layer0/knocking_v.weight"

    def pixel(row, col):  # top-left pixel of a cell
        start = row * 4 * (1 + 3 * width) + 1 + col * 4 * 3
        return tuple(pixels[start:start + 3])

    assert pixel(0, 0) == (180, 4, 38) and pixel(0, 2) == (59, 76, 192) and pixel(0, 1) == (247, 247, 247)
    assert pixel(1, 1) == (128, 128, 128)
    red, green, blue = pixel(1, 0)
    assert red > blue and green < 247  # +0.5: pale red
    assert os.listdir(tmp_path / "sub") == ["m.png"]  # no temp file left behind


def test_model_heatmaps_one_png_per_matrix(tmp_path):
    ensure_single_rank()
    model = build_gpt(tiny_config(attention_variant="mea", num_query_groups=4, mea_virtual_kv_heads=2))
    paths = write_model_heatmaps(model, str(tmp_path), step=100)
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        f"layer{i}_{name}_step0000100.png" for i in range(2) for name in ("key_composition", "value_composition"))
    width, height, pixels, _ = _read_png(paths[0])
    assert width == 2 * height and len(pixels) == height * (1 + 3 * width)  # [h', h] = [2, 4]


# --- GPU telemetry -----------------------------------------------------------------------------
def _fake_pynvml(device_count, fail_init=False):
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def power(handle):
        raise NVMLError("Not Supported")

    nvml.NVMLError, nvml.nvmlInit, nvml.nvmlShutdown = NVMLError, init, lambda: None
    nvml.nvmlDeviceGetCount = lambda: device_count
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) * 2**30)
    nvml.nvmlDeviceGetPowerUsage = power
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40 + h)
    return nvml


def test_gpu_telemetry_without_gpu_is_silent(monkeypatch, capsys):
    for fake in (None, _fake_pynvml(0, fail_init=True), _fake_pynvml(0)):  # no module, no driver, no GPU
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        telemetry = GpuTelemetry()
        assert telemetry.available is False and telemetry.unavailable_reason
        assert telemetry.sample() == {}
        telemetry.close()
    assert capsys.readouterr() == ("", "")


def test_gpu_telemetry_reads_each_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(2))
    telemetry = GpuTelemetry()
    assert telemetry.available
    assert telemetry.sample() == {"gpu0/memory_used_gib": 1.0, "gpu0/utilization_pct": 40.0,
                                  "gpu1/memory_used_gib": 2.0, "gpu1/utilization_pct": 41.0}
    assert list(GpuTelemetry(device_indices=[1]).sample()) == ["gpu1/memory_used_gib", "gpu1/utilization_pct"]


def test_gpu_telemetry_on_this_host():
    telemetry = GpuTelemetry()  # never raises, whatever this host has
    sample = telemetry.sample()
    assert (sample == {}) == (not telemetry.available)
    assert all(isinstance(v, float) for v in sample.values())
    telemetry.close()
    assert telemetry.sample() == {}


@pytest.mark.gpu
def test_gpu_telemetry_with_gpu_returns_numbers():
    telemetry = GpuTelemetry()
    assert telemetry.available, telemetry.unavailable_reason
    sample = telemetry.sample()
    assert "gpu0/memory_used_gib" in sample and sample["gpu0/memory_used_gib"] > 0
    assert all(isinstance(v, float) and v >= 0 for v in sample.values())
    telemetry.close()


# --- TensorBoard -------------------------------------------------------------------------------
def _tensorboard_installed():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_scalar_logger_with_or_without_tensorboard(tmp_path):
    logger = ScalarLogger(str(tmp_path))
    logger.add_scalars(1, {"train/loss": 2.5, "train/grad_norm": torch.tensor(0.7)})
    logger.close()
    if _tensorboard_installed():
        assert logger.disabled_reason is None
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    else:
        assert "tensorboard" in logger.disabled_reason.lower()
        assert os.listdir(tmp_path) == []


def test_scalar_logger_writes_through_summary_writer(monkeypatch, tmp_path):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    logger = ScalarLogger(str(tmp_path))
    logger.add_scalars(7, {"a": torch.tensor(1.5)})
    logger.close()
    assert written == [("open", str(tmp_path)), ("a", 1.5, 7), "closed"]
    assert ScalarLogger(str(tmp_path), enabled=False).disabled_reason.startswith("disabled on this rank")


# --- progress ----------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_log_lines_with_eta():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(total=100, stream=stream, every_percent=25, clock=clock)
    for _ in range(100):
        clock.now += 0.5
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and all("ETA" in line for line in lines)
    assert lines[0].startswith(" 25/100  25.0%") and "2.00 it/s" in lines[0] and "ETA 0:00:38" in lines[0]
    assert lines[-1].startswith("100/100 100.0%") and "ETA 0:00:00" in lines[-1]


def test_progress_bar_tty_redraws_and_disabled_is_silent():
    stream, clock = _TTY(), _Clock()
    with ProgressBar(total=10, stream=stream, initial=5, clock=clock, min_interval_s=0) as bar:
        clock.now += 1.0
        bar.update()
    text = stream.getvalue()
    assert text.startswith("\r 6/10  60.0% | 1.00 it/s | ETA 0:00:04") and text.endswith("\n")
    quiet = io.StringIO()
    bar = ProgressBar(total=10, enabled=False, stream=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""
