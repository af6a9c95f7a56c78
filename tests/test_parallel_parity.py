"""Parallel layouts equal TP=PP=EP=1 on the same weights and data: logits, losses, every gradient.

Each case runs on the persistent gloo pool; see tests/parallel_tasks.py for the procedure.
Tolerances are fp32 reduction-order noise: TP changes summation order, PP/EP should not.
"""
import pytest

from tests.parallel_tasks import parity_task

KHA_ALL = dict(attention_variant="kha", kha_targets="qkv", kha_init="random")
KHA_MLP = dict(attention_variant="kha", kha_type="mlp", kha_init="random")
MEA = dict(attention_variant="mea", qk_layernorm=True)
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.0, moe_ffn_hidden_size=64)


def _check(results, logits_tol, grad_tol, expect_replicated=True):
    for rank, r in enumerate(results):
        assert r["ref_grad_max"] > 1e-3, "reference gradients are (near) zero: the test would prove nothing"
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert r["logits"] <= logits_tol, (rank, r["logits"])
        assert r["loss"] <= logits_tol, (rank, r["loss"])
        assert worst[1] <= grad_tol, (rank, worst)
        assert abs(r["grad_norm"] - r["ref_grad_norm"]) <= 1e-5 * r["ref_grad_norm"], (rank, r["grad_norm"], r["ref_grad_norm"])
        if expect_replicated:  # knocking maps / composition matrices exist and were compared
            assert r["replicated"], "no KHA/MEA params on this rank"
            assert all(n in r["grads"] for n in r["replicated"])


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(KHA_ALL, qk_layernorm=True),
        dict(KHA_MLP),
        dict(KHA_ALL, num_query_groups=1),  # MQA: KV group smaller than TP (all-gather + slice path)
        dict(attention_variant="baseline", qk_layernorm=True),
        dict(MEA),
        dict(MEA, num_attention_heads=8, num_query_groups=4, kv_channels=8, mea_virtual_kv_heads=2),
        dict(MEA, mea_virtual_kv_heads=1),  # h' < TP: each component computed by two ranks
        dict(MEA, num_query_groups=1, mea_head_norm=False),  # h < TP: composite head shared by both ranks
    ],
    ids=["kha-linear-qkv-qknorm", "kha-mlp", "kha-mqa", "baseline", "mea", "mea-virtual2of4", "mea-virtual1", "mea-mqa"],
)
def test_tp2_equals_tp1(pool2, cfg, sp):
    _check(pool2.run(parity_task, cfg, tp=2, sp=sp), 2e-6, 2e-7, cfg["attention_variant"] != "baseline")


def test_tp2_sp_with_bare_layer_spec(pool2):
    # TransformerBlock picks the final norm itself here; on CPU it must be SP-aware too.
    _check(pool2.run(parity_task, KHA_ALL, tp=2, sp=True, layer_spec=True), 2e-6, 2e-7)


@pytest.mark.parametrize("cfg", [KHA_ALL, KHA_MLP, dict(MEA, mea_virtual_kv_heads=1)], ids=["kha-linear", "kha-mlp", "mea"])
def test_pp2_equals_pp1(pool2, cfg):
    results = pool2.run(parity_task, cfg, pp=2)
    assert [r["last_stage"] for r in results] == [False, True]
    _check(results, 0.0, 1e-7)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_moe_ep2_equals_ep1(pool2, dispatcher):
    cfg = dict(KHA_ALL, moe_token_dispatcher_type=dispatcher, **MOE)
    # Each rank feeds its own batch so tokens really cross ranks to reach their experts.
    _check(pool2.run(parity_task, cfg, ep=2, per_rank_data=True), 1e-6, 1e-7)


def test_tp2_pp2_on_four_ranks(pool4):
    cfg = dict(KHA_ALL, num_layers=4)
    results = pool4.run(parity_task, cfg, tp=2, pp=2, sp=True)
    assert sum(r["last_stage"] for r in results) == 2
    _check(results, 2e-6, 2e-7)
