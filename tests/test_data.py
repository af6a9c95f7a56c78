"""The data side of training: tokenizers, preprocessing to IndexedDataset, the default corpus,
Megatron GPT datasets, and the resumable data-parallel micro-batch iterator."""
import importlib.util
import json
import os

import numpy
import pytest
import torch

from megatron_kha.train.data import (
    MicroBatchIterator, build_datasets, build_default_corpus, causal_mask, default_corpus, stdlib_sources,
)
from megatron_kha.train.tokenizer import ByteTokenizer, load_tokenizer

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "preprocess_data.py")
_spec = importlib.util.spec_from_file_location("preprocess_data_tool", _TOOL)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
preprocess_main = _tool.main

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "Grüße, 世界! emoji 🚀 and a tab\tand\r\nCRLF line ends\r\n",
    "no trailing newline",
    "x" * 3000,
]


def _documents(prefix):
    """Token documents of an IndexedDataset, as lists."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _preprocess(capsys, *argv):
    """Run the CLI in-process; (exit code, stderr)."""
    try:
        code = preprocess_main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _write_corpus(directory, n_docs, seed=0):
    rng = numpy.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "knock", "head", "attention", "\n"]
    path = os.path.join(directory, f"docs{seed}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(20, 200))))}) + "\n")
    return path


@pytest.fixture(scope="module")
def small_prefix(tmp_path_factory):
    """A 200-document byte-tokenized IndexedDataset."""
    d = tmp_path_factory.mktemp("small")
    from megatron_kha.train.preprocess import preprocess

    return preprocess([_write_corpus(str(d), 200)], str(d / "small"), log=None)["text"]


# ---- tokenizer -------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_megatron_attributes():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.detokenize(ids + [tok.eod, tok.pad]) == text
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)
    assert tok.pad != tok.eod
    json.dumps(tok.unique_identifiers)  # hashed into Megatron's cache names


def test_load_tokenizer_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    # An empty directory: an ImportError when neither transformers nor tokenizers is installed,
    # a ValueError from whichever is; the flag is named either way.
    with pytest.raises((ImportError, ValueError), match="--tokenizer"):
        load_tokenizer(str(tmp_path))


# ---- preprocessing -----------------------------------------------------------------------------


def test_preprocess_round_trips_txt_and_jsonl(tmp_path, capsys):
    tok = ByteTokenizer()
    txt_files = []
    for i, text in enumerate(TEXTS):
        path = tmp_path / f"doc{i}.txt"
        path.write_bytes(text.encode("utf-8"))
        txt_files.append(str(path))
    (tmp_path / "empty.txt").write_bytes(b"")  # skipped
    code, err = _preprocess(capsys, "--input", str(tmp_path / "doc*.txt"), str(tmp_path / "empty.txt"),
                            "--output-prefix", str(tmp_path / "out" / "txt"))
    assert code == 0, err
    docs = _documents(str(tmp_path / "out" / "txt"))
    assert [d[-1] for d in docs] == [tok.eod] * len(TEXTS)
    assert [tok.detokenize(d[:-1]) for d in docs] == TEXTS  # glob matches sorted: doc0..doc3

    records = [{"text": t, "other": str(i)} for i, t in enumerate(TEXTS)]
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")
    code, err = _preprocess(capsys, "--input", str(jsonl), "--output-prefix", str(tmp_path / "js"),
                            "--json-keys", "text", "other")
    assert code == 0, err
    assert [tok.detokenize(d[:-1]) for d in _documents(str(tmp_path / "js_text"))] == TEXTS
    assert [tok.detokenize(d[:-1]) for d in _documents(str(tmp_path / "js_other"))] == ["0", "1", "2", "3"]
    meta = json.loads((tmp_path / "js_text.meta.json").read_text())
    assert meta["documents"] == len(TEXTS) and meta["vocab_size"] == tok.vocab_size

    # Worker processes give the same bytes, in the same order.
    code, err = _preprocess(capsys, "--input", str(jsonl), "--output-prefix", str(tmp_path / "js2"), "--workers", "2")
    assert code == 0, err
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"js2{suffix}").read_bytes() == (tmp_path / f"js_text{suffix}").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # temporaries renamed away


def test_preprocess_refuses_existing_output_without_force(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("first", encoding="utf-8")
    prefix = str(tmp_path / "a")
    assert _preprocess(capsys, "--input", str(src), "--output-prefix", prefix)[0] == 0
    src.write_text("second", encoding="utf-8")
    code, err = _preprocess(capsys, "--input", str(src), "--output-prefix", prefix)
    assert code == 2 and "--output-prefix" in err and "--force" in err
    assert ByteTokenizer().detokenize(_documents(prefix)[0]) == "first"  # untouched
    assert _preprocess(capsys, "--input", str(src), "--output-prefix", prefix, "--force")[0] == 0
    assert ByteTokenizer().detokenize(_documents(prefix)[0]) == "second"


def test_preprocess_bad_flags_are_named(tmp_path, capsys):
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"text": "hi"}) + "\n", encoding="utf-8")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "hi"}\n{oops\n', encoding="utf-8")
    out = str(tmp_path / "o")
    cases = [
        (["--input", str(tmp_path / "nope.txt")], "--input"),
        (["--input", str(tmp_path / "*.none")], "--input"),
        (["--input", str(bad_json)], "--input"),
        (["--input", str(good), "--json-keys", "body"], "--json-keys"),
        (["--input", str(good), "--workers", "0"], "--workers"),
        (["--input", str(good), "--tokenizer", str(tmp_path / "no-such-dir")], "--tokenizer"),
    ]
    for argv, flag in cases:
        code, err = _preprocess(capsys, *argv, "--output-prefix", out)
        assert code == 2 and f"error: {flag}" in err, (argv, err)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o.")]  # nothing half-written


# ---- the default corpus ------------------------------------------------------------------------


def test_default_corpus_builds_once_and_is_reused(tmp_path):
    cache = str(tmp_path / "cache")
    prefix, built, _seconds = build_default_corpus(cache)
    assert built and prefix.startswith(cache) and "stdlib-" in prefix
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    again, built_again, _ = build_default_corpus(cache)
    assert (again, built_again) == (prefix, False)
    assert default_corpus(cache) == prefix
    assert os.stat(prefix + ".bin").st_mtime_ns == mtime
    docs = _documents(prefix)
    files = stdlib_sources()
    assert len(docs) == len(files) > 100
    assert not any(f"/{d}/" in f"/{rel}" for rel, _, _ in files for d in ("test", "tests", "idle_test"))
    with open(files[0][1], "rb") as f:  # documents are the files, in corpus order
        assert bytes(docs[0][:-1]) == f.read()
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(os.path.dirname(prefix)),
                                                f".{os.path.basename(os.path.dirname(prefix))}.lock"])


def _concurrent_corpus_task(cache):
    torch.distributed.barrier()  # start together
    prefix, built, _ = build_default_corpus(cache)
    return prefix, built


def test_default_corpus_concurrent_ranks_build_it_once(pool2, tmp_path):
    (p0, built0), (p1, built1) = pool2.run(_concurrent_corpus_task, str(tmp_path / "cache"))
    assert p0 == p1 and [built0, built1].count(True) == 1
    assert os.path.isfile(p0 + ".idx")


# ---- GPT datasets ------------------------------------------------------------------------------


def _check_samples(ds, seq_length, vocab_size, n=8):
    for i in range(0, len(ds), max(1, len(ds) // n)):
        s = ds[i]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert s[key].shape == (seq_length,), key
        assert s["tokens"].dtype == s["labels"].dtype == torch.int64
        assert 0 <= int(s["tokens"].min()) and int(s["tokens"].max()) < vocab_size
        assert 0 <= int(s["labels"].min()) and int(s["labels"].max()) < vocab_size
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels are the next tokens
        assert torch.equal(s["position_ids"], torch.arange(seq_length))


def test_build_datasets_default_corpus_and_blend(tmp_path, small_prefix):
    tok = ByteTokenizer()
    cache = str(tmp_path / "cache")
    train, valid = build_datasets(None, 64, 1234, 500, 40, tok, cache_dir=cache)
    assert len(train) >= 500 and len(valid) >= 40
    _check_samples(train, 64, tok.vocab_size)
    _check_samples(valid, 64, tok.vocab_size)
    # Same arguments -> the same samples (indices come from the cache the first call wrote).
    train2, _ = build_datasets(None, 64, 1234, 500, 40, tok, cache_dir=cache)
    assert all(torch.equal(train[i]["tokens"], train2[i]["tokens"]) for i in (0, 7, 499))

    blend_train, blend_valid = build_datasets(["0.7", small_prefix, "0.3", default_corpus(cache)], 32, 5, 300, 20,
                                              tok, split="90,10,0", cache_dir=cache)
    assert len(blend_train) == 300 and len(blend_valid) == 20
    ids = numpy.array([blend_train[i]["dataset_id"] for i in range(300)])
    assert abs((ids == 0).mean() - 0.7) < 0.02
    _check_samples(blend_train, 32, tok.vocab_size)

    _, no_valid = build_datasets(small_prefix, 32, 5, 100, 0, tok, cache_dir=cache)
    assert no_valid is None


def test_build_datasets_errors_name_the_flag(tmp_path, small_prefix):
    tok = ByteTokenizer()
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="--data-path"):
        build_datasets(str(tmp_path / "missing"), 32, 1, 10, 10, tok, cache_dir=cache)
    with pytest.raises(ValueError, match="--data-path"):
        build_datasets(["0.5", small_prefix, "0.5"], 32, 1, 10, 10, tok, cache_dir=cache)
    with pytest.raises(ValueError, match="--split"):  # 200 documents: 0.1% for validation is none
        build_datasets(small_prefix, 32, 1, 10, 10, tok, split="999,1,0", cache_dir=cache)


def _datasets_on_ranks_task(prefix, cache):
    tok = ByteTokenizer()
    train, valid = build_datasets(prefix, 32, 7, 256, 32, tok, cache_dir=cache)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batches = MicroBatchIterator(train, 2, rank, world, 0)
    mine = [next(batches)["tokens"] for _ in range(3)]
    return len(train), [train[i]["tokens"] for i in range(4)], mine


def test_build_datasets_on_two_gloo_ranks(pool2, tmp_path, small_prefix):
    (n0, first0, mine0), (n1, first1, mine1) = pool2.run(_datasets_on_ranks_task, small_prefix, str(tmp_path / "c"))
    assert n0 == n1
    assert all(torch.equal(a, b) for a, b in zip(first0, first1))  # the same dataset on every rank
    train, _ = build_datasets(small_prefix, 32, 7, 256, 32, ByteTokenizer(), cache_dir=str(tmp_path / "c"))
    for step in range(3):  # and each rank its own part of every micro-batch
        assert torch.equal(mine0[step], torch.stack([train[4 * step + j]["tokens"] for j in (0, 1)]))
        assert torch.equal(mine1[step], torch.stack([train[4 * step + j]["tokens"] for j in (2, 3)]))


# ---- micro-batches ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_ds(small_prefix, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return build_datasets(small_prefix, 16, 3, 400, 8, ByteTokenizer(), cache_dir=cache)[0]


def test_micro_batches_shapes_and_mask(train_ds):
    it = MicroBatchIterator(train_ds, 3, 0, 1, 0)
    batch = next(it)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert batch[key].shape == (3, 16)
    assert batch["loss_mask"].dtype == torch.float32 and batch["attention_mask"].dtype == torch.bool
    assert torch.equal(batch["attention_mask"], causal_mask(16))
    assert batch["attention_mask"].shape == (1, 1, 16, 16)
    assert batch["attention_mask"][0, 0, 2, 3] and not batch["attention_mask"][0, 0, 3, 2]  # True = masked
    assert it.consumed_samples == 3


def test_micro_batches_resume_exactly(train_ds):
    mbs, dp = 2, 3
    for rank in range(dp):
        full = MicroBatchIterator(train_ds, mbs, rank, dp, 0)
        uninterrupted = [next(full) for _ in range(12)]
        stopped = MicroBatchIterator(train_ds, mbs, rank, dp, 0)
        for _ in range(5):
            next(stopped)
        resumed = MicroBatchIterator(train_ds, mbs, rank, dp, stopped.consumed_samples)
        assert resumed.consumed_samples == 5 * mbs * dp
        for expected in uninterrupted[5:]:
            got = next(resumed)
            assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert resumed.consumed_samples == full.consumed_samples


def test_micro_batches_data_parallel_ranks_are_disjoint(train_ds):
    mbs, dp, steps = 2, 4, 10
    seen = []
    for rank in range(dp):
        it = MicroBatchIterator(train_ds, mbs, rank, dp, 0)
        for step in range(steps):
            idx = it.indices(it.consumed_samples)
            batch = next(it)
            assert torch.equal(batch["tokens"], torch.stack([train_ds[i]["tokens"] for i in idx]))
            seen.extend(idx)
    assert sorted(seen) == list(range(mbs * dp * steps))  # disjoint and covering, no gaps


def test_micro_batches_end_of_dataset(train_ds):
    n, step = len(train_ds), 8
    it = MicroBatchIterator(train_ds, 4, 1, 2, n - n % step - step)
    next(it)
    with pytest.raises(StopIteration):
        next(it)
    wrapped = MicroBatchIterator(train_ds, 4, 0, 2, n - n % step, wrap_around=True)
    indices = wrapped.indices(wrapped.consumed_samples)
    assert indices == [(n - n % step + j) % n for j in range(4)]
    next(wrapped)
