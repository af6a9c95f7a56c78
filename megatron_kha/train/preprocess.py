"""Text files / JSON lines -> Megatron IndexedDataset (.bin/.idx), one document per file or record.

    preprocess(["corpus/*.txt"], "data/corpus", tokenizer="bytes")        -> {"text": "data/corpus"}
    preprocess(["a.jsonl"], "data/a", json_keys=["text", "code"])          -> {"text": "data/a_text",
                                                                               "code": "data/a_code"}

Documents: a `.jsonl`/`.json`/`.ndjson` file holds one JSON object per line, one document per
record and --json-keys key; any other file is ONE document (its exact text; newlines kept as they
are). Each document is tokenized and closed with the tokenizer's `eod`; empty ones are skipped.

Atomic: everything is written under temporary names beside the output and renamed into place at
the end, so a crash never leaves a half-written dataset under the real prefix, and a concurrent
reader sees either nothing or a whole dataset. An existing prefix is refused unless `force`.
A `<prefix>.meta.json` sidecar records the tokenizer, counts and inputs; build_datasets uses it to
refuse data tokenized with a larger vocabulary than the run's tokenizer.

Every error is a PreprocessError whose message starts with the command-line flag at fault.
"""
import glob
import json
import multiprocessing
import os
import time
import uuid
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
META_SUFFIX = ".meta.json"


class PreprocessError(ValueError):
    """A bad argument or input; the message names the flag (e.g. "--input: ...")."""


# ---- inputs --------------------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files and globs (in the order given; each glob's matches sorted), duplicates dropped."""
    if not patterns:
        raise PreprocessError("--input: no input files given")
    files, seen = [], set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"--input: no files match {pattern!r}")
        elif os.path.isfile(pattern):
            matches = [pattern]
        elif os.path.isdir(pattern):
            raise PreprocessError(f"--input: {pattern!r} is a directory; give files or a glob such as '{pattern}/**/*.txt'")
        else:
            raise PreprocessError(f"--input: no such file {pattern!r}")
        for path in matches:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def is_json_lines(path: str) -> bool:
    return path.lower().endswith(JSON_SUFFIXES)


def iter_documents(path: str, json_keys: Sequence[str]) -> Iterator[Tuple[str, str]]:
    """(key, text) for every document of one input file: a JSON-lines file gives one per record and
    key; any other file is a single document, given under the first key."""
    if not is_json_lines(path):
        try:
            with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n exactly
                text = f.read()
        except UnicodeDecodeError as err:
            raise PreprocessError(f"--input: {path} is not UTF-8 text ({err})") from None
        yield json_keys[0], text
        return
    with open(path, encoding="utf-8", newline="\n") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise PreprocessError(f"--input: {path}:{line_no} is not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise PreprocessError(f"--input: {path}:{line_no} is a JSON {type(record).__name__}, not an object")
            for key in json_keys:
                if key not in record:
                    raise PreprocessError(f"--json-keys: {path}:{line_no} has no key {key!r} "
                                          f"(its keys: {sorted(record)[:10]})")
                value = record[key]
                if not isinstance(value, str):
                    raise PreprocessError(f"--json-keys: {path}:{line_no} key {key!r} holds a "
                                          f"{type(value).__name__}, not text")
                yield key, value


# ---- writing -------------------------------------------------------------------------------


def index_paths(prefix: str) -> List[str]:
    return [prefix + ".bin", prefix + ".idx", prefix + META_SUFFIX]


def prefix_exists(prefix: str) -> bool:
    return any(os.path.exists(p) for p in index_paths(prefix)[:2])


class IndexedDatasetWriter:
    """Write token documents to `prefix`.bin/.idx under temporary names; `commit()` renames them in.

    Usable on its own (the default corpus uses it): add(ids) per document, then commit(meta).
    The eod id is appended to every document; ids are checked against the vocabulary.
    """

    def __init__(self, prefix: str, vocab_size: int, eod: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix, self.vocab_size, self.eod = prefix, int(vocab_size), int(eod)
        self.tmp_prefix = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dtype = DType.optimal_dtype(self.vocab_size)  # uint16 below 65500 ids, else int32
        self.builder = IndexedDatasetBuilder(self.tmp_prefix + ".bin", dtype=self.dtype)
        self.documents = self.tokens = self.skipped_empty = 0
        self._done = False

    def add(self, ids: Sequence[int]) -> None:
        arr = numpy.asarray(ids, dtype=numpy.int64)
        if arr.size == 0:
            self.skipped_empty += 1
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise PreprocessError(f"--tokenizer: produced token id {lo if lo < 0 else hi} outside "
                                  f"[0, vocab_size={self.vocab_size})")
        arr = numpy.append(arr, self.eod).astype(self.dtype)
        self.builder.add_document(arr, [arr.size])
        self.documents += 1
        self.tokens += int(arr.size)

    def commit(self, meta: Optional[dict] = None) -> None:
        """Finish the index and move the files to their real names (the .idx last)."""
        if self.documents == 0:
            self.abort()
            raise PreprocessError("--input: no non-empty documents found")
        self.builder.finalize(self.tmp_prefix + ".idx")
        meta = dict(meta or {}, vocab_size=self.vocab_size, eod=self.eod, documents=self.documents,
                    tokens=self.tokens, dtype=numpy.dtype(self.dtype).name)
        with open(self.tmp_prefix + META_SUFFIX, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        # meta and .bin first: a reader checks for .idx + .bin, and .idx appears last.
        for suffix in (META_SUFFIX, ".bin", ".idx"):
            os.replace(self.tmp_prefix + suffix, self.prefix + suffix)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        try:
            self.builder.data_file.close()
        except Exception:  # noqa: BLE001
            pass
        for suffix in (".bin", ".idx", META_SUFFIX):
            try:
                os.remove(self.tmp_prefix + suffix)
            except FileNotFoundError:
                pass
        self._done = True


# ---- tokenizing in worker processes -----------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _tokenize_item(item: Tuple[str, str]) -> Tuple[str, List[int]]:
    key, text = item
    return key, _WORKER_TOKENIZER.tokenize(text)


def _tokenized(items: Iterable[Tuple[str, str]], tokenizer, workers: int) -> Iterator[Tuple[str, List[int]]]:
    if workers <= 1:
        for key, text in items:
            yield key, tokenizer.tokenize(text)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_tokenize_item, items, chunksize=8)  # imap keeps the input order


# ---- the whole job ---------------------------------------------------------------------------


def output_prefixes(output_prefix: str, json_keys: Sequence[str]) -> Dict[str, str]:
    """One key -> the prefix itself; several -> "<prefix>_<key>" each."""
    if len(json_keys) == 1:
        return {json_keys[0]: output_prefix}
    return {key: f"{output_prefix}_{key}" for key in json_keys}


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: Union[str, object] = "bytes",
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    force: bool = False,
    log: Optional[Callable[[str], None]] = print,
) -> Dict[str, str]:
    """Tokenize `inputs` into IndexedDataset(s); returns {json key: written prefix}."""
    from megatron_kha.train.tokenizer import load_tokenizer

    log = log or (lambda _msg: None)
    json_keys = list(json_keys or [])
    if not json_keys or any(not isinstance(k, str) or not k for k in json_keys):
        raise PreprocessError(f"--json-keys: expected one or more non-empty key names, got {json_keys!r}")
    if len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"--json-keys: duplicate keys in {json_keys!r}")
    if not isinstance(workers, int) or workers < 1:
        raise PreprocessError(f"--workers: must be a positive integer, got {workers!r}")
    if not output_prefix or output_prefix.endswith(os.sep):
        raise PreprocessError(f"--output-prefix: expected a path prefix such as data/corpus, got {output_prefix!r}")
    output_prefix = os.path.expanduser(output_prefix)
    files = expand_inputs(inputs)
    plain = [f for f in files if not is_json_lines(f)]
    if plain and len(json_keys) > 1:
        raise PreprocessError(f"--json-keys: several keys only apply to JSON-lines inputs, but {plain[0]} is a "
                              f"plain file (one document)")
    prefixes = output_prefixes(output_prefix, json_keys)
    existing = [p for p in prefixes.values() if prefix_exists(p)]
    if existing and not force:
        raise PreprocessError(f"--output-prefix: {existing[0]}.bin/.idx already exists; pass --force to replace it")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise PreprocessError(f"--output-prefix: cannot create directory {out_dir!r} ({err})") from None
    if not os.access(out_dir, os.W_OK):
        raise PreprocessError(f"--output-prefix: directory {out_dir!r} is not writable")
    if isinstance(tokenizer, str):
        try:
            tokenizer = load_tokenizer(tokenizer)
        except (ValueError, ImportError) as err:
            raise PreprocessError(str(err) if str(err).startswith("--tokenizer") else f"--tokenizer: {err}") from None

    t0 = time.time()
    writers = {key: IndexedDatasetWriter(prefix, tokenizer.vocab_size, tokenizer.eod) for key, prefix in prefixes.items()}
    try:
        items = (item for path in files for item in iter_documents(path, json_keys))
        for key, ids in _tokenized(items, tokenizer, workers):
            writers[key].add(ids)
        for key, writer in writers.items():
            meta = {"tokenizer": dict(tokenizer.unique_identifiers), "json_key": key,
                    "inputs": [os.path.abspath(f) for f in files]}
            writer.commit(meta)
    finally:
        for writer in writers.values():
            writer.abort()  # no-op for committed ones; removes temporaries after an error
    for key, writer in writers.items():
        log(f"wrote {writer.prefix}.bin/.idx: {writer.documents} documents, {writer.tokens} tokens "
            f"({writer.skipped_empty} empty skipped) from {len(files)} file(s) in {time.time() - t0:.1f} s")
    return prefixes
