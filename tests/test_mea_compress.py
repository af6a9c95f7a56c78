"""MEA virtual-head compression (megatron_kha.convert.mea_compress, tools/mea_compress.py).

- K/V projections that are exactly rank h' across composite heads compress to h' with no loss:
  reported error ~0, the composite keys/values (fp64 reference on random inputs) and the logits
  are unchanged, query heads keep their order;
- a random plain GQA model loses information: the reported error equals the fp64 Eckart-Young
  value computed here from the singular values, beats mean-pooling heads (GQA conversion), and
  the logit difference is reported;
- the CLI round trip through the dist_checkpointing convention, and its flag errors.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_kha.convert.verify import max_logit_diff
from megatron_kha.convert import checkpoint_io
from megatron_kha.convert.mea_compress import compress_state_dict, compressed_config
from tests.gpt_factory import batch, build_gpt, randomize_, tiny_config
from tests.references import split_fused_qkv
from tests.single_rank import ensure_single_rank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "mea_compress.py")
ATTN = "decoder.layers.{}.self_attention."


@pytest.fixture(scope="module", autouse=True)
def _world():
    ensure_single_rank()


def _tool():
    spec = importlib.util.spec_from_file_location("mea_compress_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def projected_heads(state, prefix, cfg, x):
    """fp64 reference: queries [s, b, n_q, hn] and composite keys/values [s, b, h, hn] of x."""
    w = state[prefix + "linear_qkv.weight"].double()
    bias = state.get(prefix + "linear_qkv.bias")
    if bias is not None:  # the bias as one more input feature that is always 1
        w = torch.cat([w, bias.double()[:, None]], dim=1)
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    a_k, a_v = state.get(prefix + "key_composition"), state.get(prefix + "value_composition")
    groups = cfg.num_query_groups if a_k is None else a_k.shape[0]
    q, k, v = split_fused_qkv(x, w, cfg.num_attention_heads, groups, cfg.kv_channels)
    if a_k is not None:
        k = torch.einsum("sbid,ij->sbjd", k, a_k.double())
        v = torch.einsum("sbid,ij->sbjd", v, a_v.double())
    return q, k, v


def logits(model, seed=21):
    tokens, _, pos, mask = batch(seed)
    model.eval()
    with torch.no_grad():
        return model(tokens, pos, mask)


def compress_in_memory(model, h_new):
    """(compressed model, reports) built through the same functions the tool uses."""
    state, reports = compress_state_dict(model.state_dict(), model.config, h_new)
    new_model, _ = checkpoint_io.build_model(compressed_config(checkpoint_io.model_config_dict(model), h_new))
    new_model.load_state_dict(state, strict=True)
    return new_model, reports


def gqa_with_low_rank_kv(rank, seed, **cfg):
    """Plain GQA model whose K and V head weights (and biases) are random combinations of `rank` base heads."""
    model = build_gpt(tiny_config(**cfg))
    randomize_(model, seed=seed)
    config = model.config
    g = torch.Generator().manual_seed(seed + 1)
    h, hn = config.num_query_groups, config.kv_channels
    state = model.state_dict()
    for layer in range(config.num_layers):
        prefix = ATTN.format(layer)
        weight = state[prefix + "linear_qkv.weight"].view(h, config.num_attention_heads // h + 2, hn, -1)
        bias = state.get(prefix + "linear_qkv.bias")
        bias = None if bias is None else bias.view(h, -1, hn)
        for slot in (-2, -1):  # k, v: one mixing matrix for a head's weight and bias
            mix = torch.randn(rank, h, generator=g)
            weight[:, slot] = torch.einsum("ij,ihd->jhd", mix, torch.randn(rank, hn, weight.shape[-1], generator=g) * 0.2)
            if bias is not None:
                bias[:, slot] = mix.T @ torch.randn(rank, hn, generator=g) * 0.2
    model.load_state_dict(state)
    return model


def mea_with_components(seed, **cfg):
    """MEA model with random weights and random composition matrices (rank <= h' by construction)."""
    model = build_gpt(tiny_config(attention_variant="mea", **cfg))
    randomize_(model, seed=seed)
    return model


LOW_RANK_CASES = {
    # MEA with h' = 2 component heads, random A, QKV bias and QK-norm, compressed to 2
    "mea-4from2-to2": lambda: mea_with_components(31, num_attention_heads=8, num_query_groups=4,
                                                  mea_virtual_kv_heads=2, add_qkv_bias=True, qk_layernorm=True),
    # plain GQA (h = 4, 8 query heads) whose K/V heads span 2 directions, compressed to 2
    "gqa-4-rank2": lambda: gqa_with_low_rank_kv(2, seed=41, num_attention_heads=8, num_query_groups=4),
    # same with a QKV bias and QK-norm, compressed to 1 (MQA-sized cache)
    "gqa-2-rank1-bias": lambda: gqa_with_low_rank_kv(1, seed=51, num_query_groups=2, add_qkv_bias=True,
                                                     qk_layernorm=True),
}
LOW_RANK_H_NEW = {"mea-4from2-to2": 2, "gqa-4-rank2": 2, "gqa-2-rank1-bias": 1}


@pytest.mark.parametrize("case", list(LOW_RANK_CASES))
def test_exactly_low_rank_kv_compresses_without_loss(case):
    source = LOW_RANK_CASES[case]()
    cfg, h_new = source.config, LOW_RANK_H_NEW[case]
    compressed, reports = compress_in_memory(source, h_new)
    assert compressed.config.mea_virtual_kv_heads == h_new
    assert len(reports) == cfg.num_layers
    for layer, r in reports.items():
        assert r["key_rel_error"] < 1e-5 and r["value_rel_error"] < 1e-5, (layer, r)

    src_state, new_state = source.state_dict(), compressed.state_dict()
    x = torch.randn(5, 2, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for layer in range(cfg.num_layers):
        prefix = ATTN.format(layer)
        assert new_state[prefix + "key_composition"].shape == (h_new, cfg.num_query_groups)
        q0, k0, v0 = projected_heads(src_state, prefix, cfg, x)
        q1, k1, v1 = projected_heads(new_state, prefix, cfg, x)
        assert k0.abs().max() > 0.1 and v0.abs().max() > 0.1
        assert torch.equal(q0, q1), "query heads must keep their order and values"
        assert (k0 - k1).abs().max() <= 1e-5 and (v0 - v1).abs().max() <= 1e-5

    ref, out = logits(source), logits(compressed)
    assert ref.abs().max() > 0.1
    diff = (ref - out).abs().max().item()
    print(f"\n{case}: max rel. error {max(max(r['key_rel_error'], r['value_rel_error']) for r in reports.values()):.2e}, "
          f"max abs logit diff {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("heads,groups", [(8, 4), (4, 2)], ids=["gqa-8q-4kv", "gqa-4q-2kv"])
def test_keeping_every_head_of_a_random_model_is_exact(heads, groups):
    source = build_gpt(tiny_config(num_attention_heads=heads, num_query_groups=groups))
    randomize_(source, seed=61)
    compressed, reports = compress_in_memory(source, groups)
    assert all(r["key_rel_error"] < 1e-5 and r["value_rel_error"] < 1e-5 for r in reports.values())
    assert (logits(source) - logits(compressed)).abs().max() <= 1e-5


def _composite_matrix(state, prefix, cfg, slot):
    """[hn * d, h] fp64: composite head j's K (slot -2) or V (slot -1) weight as column j (no bias here)."""
    h, hn = cfg.num_query_groups, cfg.kv_channels
    w = state[prefix + "linear_qkv.weight"].double().view(h, cfg.num_attention_heads // h + 2, hn, -1)
    return w[:, slot].reshape(h, -1).T


@pytest.mark.parametrize("heads,groups,h_new", [(8, 4, 2), (4, 2, 1), (8, 4, 1)])
def test_random_gqa_reports_the_optimal_truncation_error(heads, groups, h_new, record_property):
    source = build_gpt(tiny_config(num_attention_heads=heads, num_query_groups=groups))
    randomize_(source, seed=71 + h_new)
    compressed, reports = compress_in_memory(source, h_new)
    state, cfg = source.state_dict(), source.config
    for layer in range(cfg.num_layers):
        prefix = ATTN.format(layer)
        r = reports[prefix.rstrip(".")]
        for name, slot in (("key", -2), ("value", -1)):
            m = _composite_matrix(state, prefix, cfg, slot)
            s = torch.linalg.svdvals(m)
            optimal = (s[h_new:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
            # GQA-style conversion: average each block of groups / h_new heads into one
            pooled = m.view(m.shape[0], h_new, groups // h_new).mean(-1, keepdim=True).expand(-1, -1, groups // h_new)
            pooled_error = (torch.linalg.matrix_norm(m - pooled.reshape(m.shape)) / torch.linalg.matrix_norm(m)).item()
            error = r[f"{name}_rel_error"]
            assert error > 0.05, (layer, name, error)
            assert abs(error - optimal) <= 1e-9, (layer, name, error, optimal)
            assert error < pooled_error, (layer, name, error, pooled_error)
    diff = (logits(source) - logits(compressed)).abs().max().item()
    record_property("max_abs_logit_diff", diff)
    print(f"\nrandom GQA {heads}q/{groups}kv -> h'={h_new}: errors "
          + ", ".join(f"K {r['key_rel_error']:.3f} V {r['value_rel_error']:.3f}" for r in reports.values())
          + f"; max abs logit diff {diff:.3e}")
    assert 0 < diff < float("inf")


def test_kha_state_dict_is_refused():
    model = build_gpt(tiny_config(attention_variant="kha", kha_targets="kv"))
    with pytest.raises(ValueError, match="knocking"):
        compress_state_dict(model.state_dict(), model.config, 1)
    with pytest.raises(ValueError, match="attention_variant"):
        compressed_config(checkpoint_io.model_config_dict(model), 1)


def test_cli_round_trip(tmp_path):
    source = build_gpt(tiny_config(attention_variant="mea", num_attention_heads=8, num_query_groups=4,
                                   add_qkv_bias=True, qk_layernorm=True))
    randomize_(source, seed=81)
    src = str(tmp_path / "src")
    checkpoint_io.save_model_checkpoint(source, checkpoint_io.model_config_dict(source), src)
    assert not [n for n in os.listdir(tmp_path) if n != "src"], "temporary directory left behind"
    reloaded, _ = checkpoint_io.load_model_checkpoint(src)
    for name, t in source.state_dict().items():
        if torch.is_tensor(t):
            assert torch.equal(t, reloaded.state_dict()[name]), name

    dst = str(tmp_path / "dst")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
    run = subprocess.run(
        [sys.executable, TOOL, "--load", src, "--save", dst, "--virtual-kv-heads", "2", "--sample-tokens", "12"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    print("\n" + run.stdout)
    layer_lines = [l for l in run.stdout.splitlines() if l.startswith("decoder.layers.")]
    assert len(layer_lines) == source.config.num_layers
    printed = float(re.search(r"max abs logit difference on 12 random tokens: (\S+)", run.stdout).group(1))

    loaded, config = checkpoint_io.load_model_checkpoint(dst)
    assert config["mea_virtual_kv_heads"] == 2 and config["attention_variant"] == "mea"
    assert config["num_query_groups"] == 4 and config["mea_head_norm"] is True
    assert loaded.config.mea_virtual_kv_heads == 2
    expected, reports = compress_in_memory(source, 2)
    for layer, r in reports.items():  # the printed errors are this run's errors
        assert any(l.startswith(layer) and f"{r['key_rel_error']:.3e}" in l and f"{r['value_rel_error']:.3e}" in l
                   for l in layer_lines), (layer, layer_lines)
    assert torch.equal(logits(loaded), logits(expected))
    recomputed = max_logit_diff(source, loaded, 12, 0)
    assert recomputed > 0 and abs(printed - recomputed) <= 1e-3 * recomputed


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    model = build_gpt(tiny_config(num_attention_heads=8, num_query_groups=4))
    randomize_(model, seed=91)
    path = str(tmp_path_factory.mktemp("ckpt") / "src")
    checkpoint_io.save_model_checkpoint(model, checkpoint_io.model_config_dict(model), path)
    return path


@pytest.mark.parametrize(
    "flags,named,allowed",
    [
        (["--virtual-kv-heads", "3"], "--virtual-kv-heads", "allowed: 1, 2, 4"),
        (["--virtual-kv-heads", "0"], "--virtual-kv-heads", "allowed: 1, 2, 4"),
        (["--virtual-kv-heads", "8"], "--virtual-kv-heads", "allowed: 1, 2, 4"),
        (["--virtual-kv-heads", "two"], "--virtual-kv-heads", "invalid int value"),
        (["--virtual-kv-heads", "2", "--sample-tokens", "-1"], "--sample-tokens", "allowed: 0"),
    ],
    ids=["not-divisor", "zero", "above-h", "not-int", "negative-tokens"],
)
def test_bad_flags_name_the_flag(small_checkpoint, tmp_path, capsys, flags, named, allowed):
    with pytest.raises(SystemExit) as exit_info:
        _tool().main(["--load", small_checkpoint, "--save", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and allowed in err, err
    assert not os.path.exists(tmp_path / "out")


def test_bad_load_and_missing_flag(tmp_path, capsys):
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.main(["--load", str(tmp_path / "missing"), "--save", str(tmp_path / "out"), "--virtual-kv-heads", "1"])
    assert "--load" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        tool.main(["--load", str(tmp_path / "empty"), "--save", str(tmp_path / "out"), "--virtual-kv-heads", "1"])
    assert "--load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--load", str(tmp_path / "empty"), "--save", str(tmp_path / "out")])
    assert "--virtual-kv-heads" in capsys.readouterr().err


def test_existing_output_needs_force(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    tool = _tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--load", small_checkpoint, "--save", str(out), "--virtual-kv-heads", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--save" in err and "--force" in err, err
    assert (out / "keep.txt").read_text() == "precious"
    model, _ = checkpoint_io.load_model_checkpoint(small_checkpoint)
    with pytest.raises(FileExistsError):
        checkpoint_io.save_model_checkpoint(model, checkpoint_io.model_config_dict(model), str(out))
    assert (out / "keep.txt").exists()

    assert tool.main(["--load", small_checkpoint, "--save", str(out), "--virtual-kv-heads", "2", "--force",
                      "--sample-tokens", "0"]) == 0
    assert not (out / "keep.txt").exists()
    assert checkpoint_io.load_config(str(out))["mea_virtual_kv_heads"] == 2
    assert sorted(os.listdir(tmp_path)) == ["out"], "temporary or old directories left behind"
