"""dist_checkpointing and optimizer steps with replicated knocking params under TP."""
import pytest
import torch

from tests.parallel_tasks import checkpoint_task, optimizer_steps_task


CASES = [
    dict(attention_variant="kha", kha_targets="qkv"),
    dict(attention_variant="kha", kha_type="mlp"),
    dict(attention_variant="mea", qk_layernorm=True),
    dict(attention_variant="mea", mea_virtual_kv_heads=1),
]
IDS = ["kha-linear-qkv", "kha-mlp", "mea", "mea-virtual1"]


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_save_tp2_load_tp1_and_pp2_bit_exact(pool2, tmp_path, cfg):
    results = pool2.run(checkpoint_task, str(tmp_path / "ckpt"), cfg)
    for r in results:
        for layout, loaded in r["loaded"].items():
            assert loaded["count"] > 0 and loaded["mismatched"] == [], (layout, loaded)
    # every knocking / composition entry is written by exactly one rank (replica id), and there are some
    keys = results[0]["writers"].keys()
    assert keys and all(k in r["writers"] for r in results for k in keys)
    assert all(sum(r["writers"][k] for r in results) == 1 for k in keys)


@pytest.mark.parametrize("cfg", CASES[:3], ids=IDS[:3])
def test_replicated_params_identical_across_tp_after_20_steps(pool2, cfg):
    r0, r1 = pool2.run(optimizer_steps_task, cfg, steps=20)
    assert r0["final"].keys() == r1["final"].keys() and r0["final"]
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name
        assert (r0["final"][name] - r0["init"][name]).abs().max() > 1e-3, f"{name} did not train"
    assert r0["losses"] == r1["losses"]
