"""Checks shared by the conversion tools: their --load/--save arguments and a logits comparison."""
import os

import torch


def check_load_save_args(parser, load: str, save: str, sample_tokens, load_flag: str = "--load") -> None:
    """Fail (via parser.error, naming the flag) before any work when the paths or counts are unusable."""
    if not os.path.isdir(load):
        parser.error(f"argument {load_flag}: {load!r} is not a directory")
    if os.path.abspath(save) == os.path.abspath(load):
        parser.error(f"argument --save: must differ from {load_flag}")
    if sample_tokens is not None and sample_tokens < 0:
        parser.error(f"argument --sample-tokens: {sample_tokens} is invalid; allowed: 0 (skip) or more")


def max_logit_diff(source, result, tokens_count: int, seed: int) -> float:
    """Max |logits_source - logits_result| on one random sequence of `tokens_count` tokens (eval, no grad)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, source.vocab_size, (1, tokens_count), generator=g)
    position_ids = torch.arange(tokens_count).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, tokens_count, tokens_count, dtype=torch.bool), diagonal=1)
    source.eval()
    result.eval()
    with torch.no_grad():
        a = source(tokens, position_ids, mask)
        b = result(tokens, position_ids, mask)
    return (a.float() - b.float()).abs().max().item()
