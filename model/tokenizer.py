"""The SESAME tokenizer: LLaMA's sentencepiece vocabulary plus `[SEG]`, `<im_start>`, `<im_end>`.

Order matters for compatibility with the released checkpoints: `[SEG]` is added first as a
normal (non-special) token, then the image delimiters as special tokens, giving ids
32000/32001/32002 on the 32000-piece LLaMA vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialTokenIds:
    seg: int
    im_start: int
    im_end: int
    pad: int
    bos: int
    eos: int


def add_sesame_tokens(tokenizer, use_mm_start_end: bool = True) -> SpecialTokenIds:
    """Add the SESAME tokens (idempotent) and return their ids. pad is set to unk, as the original."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id != tokenizer.unk_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    if "[SEG]" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["[SEG]"], special_tokens=False)
    if use_mm_start_end:
        missing = [t for t in ("<im_start>", "<im_end>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
    vocab = tokenizer.get_vocab()
    seg = tokenizer("[SEG]", add_special_tokens=False).input_ids
    if seg != [vocab["[SEG]"]]:
        raise ValueError(f"[SEG] must tokenise to one id, got {seg} (was it added after loading?)")
    return SpecialTokenIds(seg=vocab["[SEG]"], im_start=vocab.get("<im_start>", -1), im_end=vocab.get("<im_end>", -1),
                           pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
