"""Tokenizers for the data pipeline: a byte-level one that needs nothing, and Hugging Face ones from disk.

What Megatron-Core's GPTDataset reads from a tokenizer (megatron/core/datasets): `vocab_size` (picks
the token dtype), `eod` (end-of-document id, used by the EOD loss/position resets), `pad` (the id it
pads short samples with, then masks out of the loss), `eos`, and `unique_identifiers` (a JSON-able
dict hashed into the index-cache file names, so a different tokenizer never reuses stale indices).
Both classes here subclass MegatronTokenizerBase so they also pass Megatron's own type checks.
"""
import json
import os
from collections import OrderedDict
from typing import List, Sequence

import numpy
from megatron.core.tokenizers import MegatronTokenizerBase

# The sentinel Megatron's MegatronDataset uses when a tokenizer has no pad token.
NO_PAD = -1


class ByteTokenizer(MegatronTokenizerBase):
    """UTF-8 bytes as tokens: ids 0-255 are the bytes, 256 ends a document, 257 pads.

    Exact round trip for any text (detokenize(tokenize(s)) == s); nothing to download.
    """

    EOD = 256
    PAD = 257

    def __init__(self) -> None:
        super().__init__("bytes", {})

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def eos(self) -> int:
        return self.EOD

    @property
    def pad(self) -> int:
        return self.PAD

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", "megatron_kha.ByteTokenizer"), ("vocab_size", self.vocab_size)])

    @property
    def vocab(self) -> dict:
        table = {f"<0x{i:02X}>": i for i in range(256)}
        table["<eod>"], table["<pad>"] = self.EOD, self.PAD
        return table

    @property
    def inv_vocab(self) -> dict:
        return {i: s for s, i in self.vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).tolist()

    def detokenize(self, ids: Sequence[int]) -> str:
        """Special ids (eod, pad, Megatron's -1 padding) are dropped; split UTF-8 sequences become U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("ByteTokenizer has no chat template")

    def __reduce__(self):  # picklable for --workers and the data-loader
        return (ByteTokenizer, ())


_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class HFTokenizer(MegatronTokenizerBase):
    """A Hugging Face tokenizer directory on disk, through `transformers` if installed, else `tokenizers`.

    Never downloads (local_files_only). `eod` is the tokenizer's EOS token; `pad` its pad token when
    that differs from EOS, else -1 (Megatron's "no pad" sentinel: padded positions get loss 0).
    """

    def __init__(self, path: str) -> None:
        path = os.path.abspath(os.path.expanduser(path))
        super().__init__(path, {})
        self._backend, self._tok = _load_hf(path)
        if self._backend == "transformers":
            self._vocab_size = len(self._tok)
            eos, pad = self._tok.eos_token_id, self._tok.pad_token_id
        else:
            self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            eos, pad = self._special_ids_from_config(path)
        if eos is None:
            raise ValueError(f"--tokenizer {path}: the tokenizer defines no end-of-sequence token, "
                             f"which the data pipeline needs as the end-of-document id")
        self._eod = int(eos)
        self._pad = NO_PAD if pad is None or int(pad) == self._eod else int(pad)

    def _special_ids_from_config(self, path):
        """`tokenizers` alone does not know which token is EOS: read it the way transformers would."""
        names = {}
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            try:
                with open(os.path.join(path, fname), encoding="utf-8") as f:
                    cfg = json.load(f)
            except (OSError, ValueError):
                continue
            for key in ("eos_token", "pad_token"):
                value = cfg.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str) and key not in names:
                    names[key] = value
        ids = {key: self._tok.token_to_id(name) for key, name in names.items()}
        eos = ids.get("eos_token")
        if eos is None:
            eos = next((self._tok.token_to_id(t) for t in _EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        return eos, ids.get("pad_token")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", "megatron_kha.HFTokenizer"), ("tokenizer_path", self.path),
                            ("vocab_size", self._vocab_size), ("eod", self._eod)])

    @property
    def vocab(self) -> dict:
        return self._tok.get_vocab()

    @property
    def inv_vocab(self) -> dict:
        return {i: s for s, i in self.vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        if self._backend == "transformers":
            return list(self._tok(text, add_special_tokens=False)["input_ids"])
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self._vocab_size]
        return self._tok.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        if self._backend != "transformers":
            raise NotImplementedError("chat templates need `transformers`")
        return self._tok.apply_chat_template(*args, **kwargs)

    def __reduce__(self):
        return (HFTokenizer, (self.path,))


def _load_hf(path: str):
    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer {path!r}: expected 'bytes' or a Hugging Face tokenizer directory on disk "
                         f"(with tokenizer.json or tokenizer_config.json); no such directory")
    try:
        import transformers  # noqa: F401
    except ImportError:
        transformers = None
    if transformers is not None:
        try:
            return "transformers", transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - report it with the flag, whatever transformers raised
            raise ValueError(f"--tokenizer {path!r}: transformers.AutoTokenizer could not load it: {err}") from err
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"--tokenizer {path!r}: loading a Hugging Face tokenizer needs `transformers` or "
                          f"`tokenizers` (pip install tokenizers), and neither is installed; "
                          f"or use --tokenizer bytes") from None
    tokenizer_json = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise ValueError(f"--tokenizer {path!r}: no tokenizer.json in that directory (only `tokenizers` is "
                         f"installed, which needs it; install `transformers` for other formats)")
    try:
        return "tokenizers", tokenizers.Tokenizer.from_file(tokenizer_json)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"--tokenizer {path!r}: tokenizers could not read tokenizer.json: {err}") from err


def load_tokenizer(spec: str) -> MegatronTokenizerBase:
    """`spec` is the value of --tokenizer: "bytes", or a Hugging Face tokenizer directory on disk."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--tokenizer: expected 'bytes' or a directory, got {spec!r}")
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)
