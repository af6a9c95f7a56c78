"""The training entry point: bad flags fail fast, kill-and-resume is exact, interrupted saves are ignored."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_kha.train.args import parse_args
from megatron_kha.world import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--kha-targets", "x", "--attention-variant", "kha"], "--kha-targets"),
        (["--attention-variant", "knock"], "--attention-variant"),
        (["--num-layers", "0"], "--num-layers"),
        (["--lr", "-1"], "--lr"),
        (["--min-lr", "1.0", "--lr", "0.1"], "--min-lr"),
        (["--micro-batch-size", "3", "--global-batch-size", "4"], "--global-batch-size"),
        (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], "--tensor-model-parallel-size"),
        (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size"),
        (["--attention-variant", "mea", "--mea-virtual-kv-heads", "8"], "--mea-virtual-kv-heads"),
        (["--attention-variant", "kha", "--kha-type", "mlp", "--kha-targets", "qk"], "--kha-targets"),
        (["--seq-length", "64", "--max-position-embeddings", "32"], "--max-position-embeddings"),
        (["--load", "/nonexistent/dir"], "--load"),
        (["--train-iters", "5", "--lr-warmup-iters", "5"], "--lr-warmup-iters"),
        (["--context-parallel-size", "2"], "--context-parallel-size"),
    ],
)
def test_bad_flags_fail_before_any_work_naming_the_flag(argv, flag, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def _train_cmd(tmp, name, extra=()):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "megatron_kha.train",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "12",
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--attention-variant", "kha", "--kha-targets", "qkv", "--hidden-dropout", "0.1",
        "--eval-interval", "1000", "--eval-iters", "0", "--log-interval", "1", "--no-progress-bar",
        "--metrics-interval", "4", "--heatmap-dir", str(tmp / f"{name}-heatmaps"),
        "--data-cache-dir", str(tmp / "data-cache"), "--metrics-file", str(tmp / f"{name}.jsonl"), *extra,
    ]


def _losses(path):
    if not os.path.exists(path):
        return {}
    out = {}
    for line in open(path):
        record = json.loads(line)
        if "lm_loss" in record:
            out[record["iteration"]] = record["lm_loss"]
    return out


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def test_sigkill_and_resume_logs_the_uninterrupted_losses(tmp_path):
    full = subprocess.run(_train_cmd(tmp_path, "full"), env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = _losses(tmp_path / "full.jsonl")
    assert sorted(reference) == list(range(1, 13))
    # the periodic head metrics ran (they only read the model, so the losses stay comparable)
    records = [json.loads(line) for line in open(tmp_path / "full.jsonl")]
    metrics = [r for r in records if any(k.startswith("identity_distance/") for k in r)]
    assert [r["iteration"] for r in metrics] == [4, 8, 12]
    assert all(any(k.startswith("head_cosine/") for k in r) for r in metrics)
    assert metrics[-1]["identity_distance/layer0/knocking_v.weight"] > 0  # T moved away from I
    assert len(os.listdir(tmp_path / "full-heatmaps")) == 3 * 2 * 3  # 3 times x 2 layers x q, k, v

    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "3"]
    killed = subprocess.Popen(_train_cmd(tmp_path, "killed", save), env=_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and max(_losses(tmp_path / "killed.jsonl"), default=0) < 5 and killed.poll() is None:
        time.sleep(0.01)
    # SIGKILL the launcher and both ranks (torchrun starts its workers in sessions of their own)
    for proc in psutil.Process(killed.pid).children(recursive=True) + [psutil.Process(killed.pid)]:
        proc.send_signal(signal.SIGKILL)
    killed.wait()
    time.sleep(0.5)  # let the killed ranks' files settle before reading the metrics
    before_kill = _losses(tmp_path / "killed.jsonl")
    assert 5 <= max(before_kill) < 12, f"the run was not killed mid-way: reached {max(before_kill)}"

    resume = ["--load", str(tmp_path / "ckpt"), *save]
    resumed = subprocess.run(_train_cmd(tmp_path, "resumed", resume), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _losses(tmp_path / "resumed.jsonl")
    assert after and max(after) == 12 and (min(after) - 1) % 3 == 0  # resumed right after a complete save
    for step, loss in {**before_kill, **after}.items():
        assert loss == reference[step], (step, loss, reference[step])  # bit-exact on CPU


def test_interrupted_save_never_becomes_latest(pool2, tmp_path):
    from tests.train_tasks import interrupted_save_task

    for result in pool2.run(interrupted_save_task, str(tmp_path / "ckpt")):
        assert result["tracker_after_failed_save"] == 1
        assert result["incomplete_left"] and not result["final_of_failed_exists"]
        assert result["loaded_iteration"] == 1 and result["weights_restored"]
        assert result["tracker_after_retry"] == 2 and not result["incomplete_after_retry"]


@pytest.mark.parametrize(
    "layout",
    [
        ["--attention-variant", "mea", "--mea-virtual-kv-heads", "1", "--pipeline-model-parallel-size", "2"],
        ["--attention-variant", "kha", "--kha-type", "mlp", "--kha-targets", "v", "--num-experts", "4",
         "--expert-model-parallel-size", "2"],
    ],
    ids=["mea-pp2", "kha-mlp-moe-ep2"],
)
def test_entry_point_trains_other_layouts(tmp_path, layout):
    cmd = _train_cmd(tmp_path, "run", layout)
    i = cmd.index("--tensor-model-parallel-size")
    cmd[i + 1] = "1"  # two ranks go to PP or EP/DP instead
    cmd[cmd.index("--train-iters") + 1] = "6"
    cmd[cmd.index("--lr-warmup-iters") + 1] = "1"
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = _losses(tmp_path / "run.jsonl")
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1]  # it learns
