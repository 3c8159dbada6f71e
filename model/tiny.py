"""A tiny random SESAME for tests and the quick start: same code path, toy sizes.

The tokenizer is a small sentencepiece model trained on the fly (LLaMA's conventions: unk 0,
bos 1, eos 2, byte fallback), so nothing is downloaded.
"""
from __future__ import annotations

import io
import os
from typing import Optional

import torch

from .config import SesameConfig
from .sesame import SesameModel
from .tokenizer import SpecialTokenIds, add_sesame_tokens

_CORPUS = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: ASSISTANT: Can you confirm if the man in red is present in this image? If it is, kindly provide the segmentation map.
If it isn't, please state so and, if appropriate, mention any objects that might be mistaken for it.
Sure, the segmentation result is here. It is. No, there is no dog in this picture, but there is a cat.
While the red square is not present, the image does include a blue circle. Yes, the green triangle is detected.
the left zebra, person on right, white car, small yellow star, big purple ellipse, a shape near the top left corner.
What is in this image? Please output segmentation mask. Please respond with segmentation mask.
0 1 2 3 4 5 6 7 8 9 ( ) [ ] : ; ! ? - ' " , .
"""


def train_tiny_sentencepiece(out_dir: str, vocab_size: int = 512, extra_text: str = "") -> str:
    """Train a byte-fallback BPE sentencepiece model like LLaMA's; returns the tokenizer.model path."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    lines = [line for line in (_CORPUS + extra_text).splitlines() if line.strip()] * 10
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2, num_threads=1)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def tiny_tokenizer(directory: str):
    """The SESAME tokenizer over a tiny sentencepiece model found (or trained) in `directory`."""
    from transformers import LlamaTokenizer

    if not os.path.exists(os.path.join(directory, "tokenizer.model")):
        train_tiny_sentencepiece(directory)
    tok = LlamaTokenizer.from_pretrained(directory, legacy=True, add_bos_token=True, add_eos_token=False)
    ids = add_sesame_tokens(tok)
    return tok, ids


def tiny_model(tokens: SpecialTokenIds, vocab_size: int, seed: int = 0, sasp=None,
               dtype: torch.dtype = torch.float32, device: Optional[str] = None) -> SesameModel:
    cfg = SesameConfig.tiny(vocab_size=vocab_size, sasp=sasp)
    cfg.llm.pad_token_id, cfg.llm.bos_token_id, cfg.llm.eos_token_id = tokens.pad, tokens.bos, tokens.eos
    torch.manual_seed(seed)
    model = SesameModel(cfg, seg_token_id=tokens.seg)
    return model.to(device=device or "cpu", dtype=dtype).eval()
