"""Training data: Megatron-Core's GPTDataset over IndexedDatasets, and a resumable micro-batch iterator.

    tokenizer = load_tokenizer("bytes")
    train_ds, valid_ds = build_datasets(None, seq_length=256, seed=1234, train_samples=10_000,
                                        valid_samples=512, tokenizer=tokenizer)   # None: default corpus
    batches = MicroBatchIterator(train_ds, micro_batch_size=4, data_parallel_rank=r,
                                 data_parallel_size=dp, consumed_samples=resumed_consumed)

The default corpus is the running interpreter's standard-library sources (no download): built once
into an IndexedDataset under the cache directory and reused by every later run and every rank.
Dataset indices (GPTDataset's document/sample/shuffle .npy files) are cached under
`<cache_dir>/indices`, keyed by Megatron's hash of the dataset description.

Ordering is deterministic: GPTDataset shuffles once from `seed`; the iterator then walks the
shuffled samples in order, micro-batch k of the run being samples [k*mbs*dp, (k+1)*mbs*dp), of which
data-parallel rank r takes [r*mbs, (r+1)*mbs). Everything a resumed run needs is consumed_samples.
"""
import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from megatron_kha.train.preprocess import META_SUFFIX, IndexedDatasetWriter
from megatron_kha.train.tokenizer import ByteTokenizer

CACHE_ENV = "MEGATRON_KHA_CACHE_DIR"
CORPUS_BYTE_BUDGET = 8 * 1024 * 1024  # bytes of source text in the default corpus
_CORPUS_FORMAT = 1  # bump when the corpus recipe changes: old caches are then ignored
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})


def default_cache_dir() -> str:
    """$MEGATRON_KHA_CACHE_DIR, else $XDG_CACHE_HOME/megatron_kha, else ~/.cache/megatron_kha."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "megatron_kha")


# ---- the default corpus ----------------------------------------------------------------------


def stdlib_sources(byte_budget: int = CORPUS_BYTE_BUDGET) -> List[Tuple[str, str, int]]:
    """(relative path, path, size) of the standard-library .py files in the corpus, in corpus order.

    Test directories are skipped. Files are ordered by a hash of their relative path (a fixed,
    well-mixed order, so the train/valid split is not "a-w" vs "x-z") and taken while they fit
    the byte budget.
    """
    root = sysconfig.get_path("stdlib")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                files.append((os.path.relpath(path, root).replace(os.sep, "/"), path, os.path.getsize(path)))
    files.sort(key=lambda f: (hashlib.sha1(f[0].encode()).hexdigest(), f[0]))
    chosen, total = [], 0
    for rel, path, size in files:
        if 0 < size and total + size <= byte_budget:
            chosen.append((rel, path, size))
            total += size
    return chosen


def _corpus_name(files, tokenizer, byte_budget: int) -> str:
    v = sys.version_info
    key = json.dumps({"format": _CORPUS_FORMAT, "python": list(v[:3]), "budget": byte_budget,
                      "tokenizer": dict(tokenizer.unique_identifiers), "files": [f[0::2] for f in files]})
    return f"stdlib-{v.major}.{v.minor}.{v.micro}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive flock: concurrent builders on one host queue up instead of all building.
    (Correctness never depends on it: the atomic directory rename below decides the winner.)"""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the rename alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _corpus_ready(directory: str) -> bool:
    prefix = os.path.join(directory, "corpus")
    return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")


def build_default_corpus(cache_dir: Optional[str] = None, tokenizer=None,
                         byte_budget: int = CORPUS_BYTE_BUDGET) -> Tuple[str, bool, float]:
    """Like default_corpus, and also says whether this call built it and how long that took:
    (prefix, built_here, seconds)."""
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    files = stdlib_sources(byte_budget)
    if not files:
        raise RuntimeError(f"no standard-library .py sources under {sysconfig.get_path('stdlib')!r} for the "
                           f"default corpus; pass --data-path")
    name = _corpus_name(files, tokenizer, byte_budget)
    final = os.path.join(cache_dir, name)
    prefix = os.path.join(final, "corpus")
    if _corpus_ready(final):
        return prefix, False, 0.0
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise OSError(f"--data-cache-dir: cannot create {cache_dir!r} for the default corpus ({err})") from err
    with _file_lock(os.path.join(cache_dir, f".{name}.lock")):
        if _corpus_ready(final):  # another process built it while we waited
            return prefix, False, 0.0
        t0 = time.time()
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir)
        try:
            writer = IndexedDatasetWriter(os.path.join(tmp, "corpus"), tokenizer.vocab_size, tokenizer.eod)
            for _rel, path, _size in files:
                with open(path, "rb") as f:
                    writer.add(tokenizer.tokenize(f.read().decode("utf-8", errors="replace")))
            writer.commit({"tokenizer": dict(tokenizer.unique_identifiers), "source": sysconfig.get_path("stdlib"),
                           "files": [f[0] for f in files]})
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            try:
                os.rename(tmp, final)  # atomic; fails if another process (e.g. on another host) won
            except OSError:
                if not _corpus_ready(final):
                    raise
                return prefix, False, 0.0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return prefix, True, time.time() - t0


def default_corpus(cache_dir: Optional[str] = None, tokenizer=None,
                   log: Optional[Callable[[str], None]] = None) -> str:
    """The IndexedDataset prefix of the default corpus, building it on first use.

    The corpus: this interpreter's standard-library .py files (no test directories), one document
    each, up to CORPUS_BYTE_BUDGET bytes, tokenized with `tokenizer` (default: bytes). It lives in
    `<cache_dir>/stdlib-<python version>-<hash>/corpus.{bin,idx,meta.json}`, the hash covering the
    file list, sizes, tokenizer and recipe. Safe to call from many processes at once, with or
    without torch.distributed: one builds (into a temporary directory, renamed into place), the
    others wait on a file lock and reuse it. Not collective.
    """
    prefix, built, seconds = build_default_corpus(cache_dir, tokenizer)
    if built and log is not None:
        with open(prefix + META_SUFFIX, encoding="utf-8") as f:
            meta = json.load(f)
        log(f"built the default corpus ({meta['documents']} standard-library files, {meta['tokens']} tokens) "
            f"in {seconds:.1f} s: {prefix}")
    return prefix


# ---- GPT datasets ----------------------------------------------------------------------------


def parse_data_path(data_path: Union[None, str, Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's --data-path syntax: "p", ["p1", "p2"] or ["w1", "p1", "w2", "p2"] -> (prefixes, weights)."""
    items = [data_path] if isinstance(data_path, str) else [str(x) for x in data_path]
    items = [x.strip() for x in items if x.strip()]
    if not items:
        raise ValueError("--data-path: empty")

    def number(s):
        try:
            return float(s)
        except ValueError:
            return None

    if len(items) % 2 == 0 and all(number(items[i]) is not None for i in range(0, len(items), 2)):
        weights, prefixes = [number(items[i]) for i in range(0, len(items), 2)], items[1::2]
        if any(w <= 0 for w in weights):
            raise ValueError(f"--data-path: blend weights must be positive, got {weights}")
    elif any(number(x) is not None and not os.path.exists(x + ".idx") for x in items):
        raise ValueError(f"--data-path: expected prefixes, or weight prefix pairs (\"0.7 p1 0.3 p2\"), got {items}")
    else:
        weights, prefixes = None, items
    fixed = []
    for p in prefixes:
        p = os.path.expanduser(p)
        if p.endswith((".bin", ".idx")) and os.path.isfile(p[:-4] + ".idx"):
            p = p[:-4]  # a common slip: the file instead of its prefix
        if not (os.path.isfile(p + ".idx") and os.path.isfile(p + ".bin")):
            raise ValueError(f"--data-path: no IndexedDataset at prefix {p!r} (need {p}.bin and {p}.idx; "
                             f"make them with tools/preprocess_data.py)")
        fixed.append(p)
    return fixed, weights


def _check_tokenizer_matches(prefix: str, tokenizer) -> None:
    """Data tokenized with a bigger vocabulary than the model's embedding would index past it."""
    try:
        with open(prefix + META_SUFFIX, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return  # made by another tool: nothing to check against
    if int(meta.get("vocab_size", 0)) > tokenizer.vocab_size:
        raise ValueError(f"--tokenizer: {prefix} was tokenized with vocab_size {meta['vocab_size']} "
                         f"({meta.get('tokenizer')}) but this run's tokenizer has {tokenizer.vocab_size}")
    if meta.get("tokenizer") is not None and meta["tokenizer"] != json.loads(json.dumps(tokenizer.unique_identifiers)):
        warnings.warn(f"--tokenizer: {prefix} was tokenized with {meta['tokenizer']}, not with this run's "
                      f"{dict(tokenizer.unique_identifiers)}", stacklevel=3)


def _document_count(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return len(IndexedDataset(prefix).sequence_lengths)


def _builder_class():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    class Builder(BlendedMegatronDatasetBuilder):
        """Megatron's builder, usable without torch.distributed for blends too: BlendedDataset asks
        torch.distributed.get_rank() on an index-cache miss, so in a single process without a
        process group its (cheap) blending indices are built in memory instead of cached."""

        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                config = copy.copy(args[-1])
                config.path_to_cache = None
                args = (*args[:-1], config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)

    return Builder


def build_datasets(
    data_path: Union[None, str, Sequence[str]],
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    tokenizer,
    split: str = "969,30,1",
    cache_dir: Optional[str] = None,
    *,
    eod_mask_loss: bool = False,
    log: Optional[Callable[[str], None]] = None,
):
    """(train_ds, valid_ds): Megatron GPTDatasets (BlendedDataset for a weighted blend).

    data_path: None (default corpus), a prefix, or Megatron's blend list ["0.7", "p1", "0.3", "p2"].
    train_samples / valid_samples: samples each split must provide (more epochs are drawn if the
    data is smaller). valid_ds is None when valid_samples is 0 or the split gives validation no
    share. The test split of `split` is held out and never built.
    Each sample: tokens/labels/position_ids [seq_length] int64, loss_mask [seq_length] float
    (0 on padding, and on EOD tokens with eod_mask_loss).

    Collective when torch.distributed is initialized: every rank must call it (rank 0 builds the
    index caches first, the others wait on a barrier, then load them). Also works in a single
    process without a process group.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    if seq_length < 1:
        raise ValueError(f"--seq-length: must be positive, got {seq_length}")
    if train_samples is None or train_samples < 1:
        raise ValueError(f"train_samples must be positive (--train-iters * --global-batch-size), got {train_samples}")
    valid_samples = int(valid_samples or 0)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    if data_path is None or (not isinstance(data_path, str) and len(data_path) == 0):
        prefixes, weights = [default_corpus(cache_dir, tokenizer, log=log)], None
    else:
        prefixes, weights = parse_data_path(data_path)
    for p in prefixes:
        _check_tokenizer_matches(p, tokenizer)

    try:
        split_vector = parse_and_normalize_split(split)
    except (AssertionError, ValueError, ZeroDivisionError):
        raise ValueError(f"--split: expected up to three non-negative weights like '969,30,1', got {split!r}") from None
    if not split_vector[0] > 0:
        raise ValueError(f"--split {split!r}: gives the training split no documents")

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=os.path.join(cache_dir, "indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,  # MicroBatchIterator hands out one shared causal mask
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # per-sample [1, s, s] masks: memory and time for nothing
    )
    # Hold the test split out without building it (we never evaluate on it), and drop validation
    # when nobody asks for it: same document boundaries as Megatron-LM's split, less work, and no
    # zero-document split (GPTDataset loops forever drawing epochs from zero tokens).
    config.split_matrix = list(config.split_matrix)
    config.split_matrix[Split.test.value] = None
    if valid_samples == 0:
        config.split_matrix[Split.valid.value] = None
    for p in prefixes:
        n = _document_count(p)
        for s in (Split.train, Split.valid):
            bounds = config.split_matrix[s.value]
            if bounds is not None and int(round(bounds[1] * n)) - int(round(bounds[0] * n)) < 1:
                raise ValueError(f"--split {split!r}: leaves the {s.name} split of {p} ({n} documents) "
                                 f"without documents; give it a larger share or add documents")

    sizes = [train_samples, valid_samples, 0]  # test: never built (split_matrix entry None)
    builder = _builder_class()(GPTDataset, sizes, lambda: True, config)
    train_ds, valid_ds, _test = builder.build()
    return train_ds, valid_ds


# ---- micro-batches ---------------------------------------------------------------------------

_SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def causal_mask(seq_length: int) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked (Megatron's convention): position i sees 0..i."""
    return torch.ones(seq_length, seq_length, dtype=torch.bool).triu_(1).view(1, 1, seq_length, seq_length)


class MicroBatchIterator:
    """Deterministic, resumable micro-batches for one data-parallel rank.

    Micro-batch k (counting from consumed_samples = 0) covers the global samples
    [k*mbs*dp, (k+1)*mbs*dp); this rank takes [k*mbs*dp + r*mbs, k*mbs*dp + (r+1)*mbs). Each next()
    advances `consumed_samples` by mbs*dp (the whole DP group's micro-batch), so after a step of
    num_microbatches it has grown by the global batch size, and an iterator created with a saved
    consumed_samples continues exactly where an uninterrupted run would be.

    Yields {tokens, labels, position_ids: int64 [mbs, s]; loss_mask: float [mbs, s];
    attention_mask: bool [1, 1, s, s] causal, True = masked, one tensor shared by all batches (do
    not modify it in place)}, all on CPU. Stops when the next micro-batch would run past the
    dataset (wrap_around=False), or starts the dataset over (wrap_around=True).
    """

    def __init__(self, dataset, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                 consumed_samples: int = 0, *, wrap_around: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size: must be positive, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if dataset is None or len(dataset) == 0:
            raise ValueError("MicroBatchIterator: empty or missing dataset")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self.wrap_around = wrap_around
        self._mask: Optional[torch.Tensor] = None

    @property
    def samples_per_micro_batch(self) -> int:
        """Samples one next() consumes across the data-parallel group."""
        return self.micro_batch_size * self.data_parallel_size

    def indices(self, consumed_samples: int) -> List[int]:
        """Dataset indices of this rank's micro-batch starting at `consumed_samples`."""
        start = consumed_samples + self.data_parallel_rank * self.micro_batch_size
        n = len(self.dataset)
        return [(start + j) % n for j in range(self.micro_batch_size)]

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __len__(self) -> int:
        """Micro-batches left (without wrap-around)."""
        return max(0, (len(self.dataset) - self.consumed_samples) // self.samples_per_micro_batch)

    def __next__(self) -> Dict[str, torch.Tensor]:
        if not self.wrap_around and self.consumed_samples + self.samples_per_micro_batch > len(self.dataset):
            raise StopIteration
        samples = [self.dataset[i] for i in self.indices(self.consumed_samples)]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in _SAMPLE_KEYS}
        seq_length = batch["tokens"].shape[1]
        if self._mask is None or self._mask.shape[-1] != seq_length:
            self._mask = causal_mask(seq_length)
        batch["attention_mask"] = self._mask
        self.consumed_samples += self.samples_per_micro_batch
        return batch
