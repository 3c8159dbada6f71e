"""The SESAME tokenizer: LLaMA's sentencepiece vocabulary plus `[SEG]`, `<im_start>`, `<im_end>`.

Order matters for compatibility with the released checkpoints: `[SEG]` is added first as a
normal (non-special) token, then the image delimiters as special tokens, giving ids
32000/32001/32002 on the 32000-piece LLaMA vocabulary.

Token ids must match what the original saw (slow `LlamaTokenizer`, transformers 4.31, `legacy=True`):
- every text chunk between added tokens is encoded by sentencepiece with its dummy prefix "▁";
- whitespace next to an added token is dropped (4.31 stripped both neighbours of every added token
  that was not registered as a special-token attribute), so "USER: <im_start>" and
  "<im_end>\\nIs" lose that space and newline. In transformers 5.x this is the added token's
  `lstrip`/`rstrip`; BOS/EOS/UNK keep their neighbours, as in 4.31.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

SEG_TOKEN = "[SEG]"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
TOKENIZER_MODEL = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


@dataclass(frozen=True)
class SpecialTokenIds:
    seg: int
    im_start: int
    im_end: int
    pad: int
    bos: int
    eos: int


def _added_token(content: str, special: bool):
    from transformers import AddedToken

    return AddedToken(content, lstrip=True, rstrip=True, normalized=False, special=special)


def _register(tokenizer, content: str, special: bool) -> int:
    """Add `content` (or re-register it with the 4.31 whitespace behaviour, keeping its id)."""
    vocab = tokenizer.get_vocab()
    old_id = vocab.get(content)
    tokenizer.add_tokens([_added_token(content, special)], special_tokens=special)
    new_id = tokenizer.convert_tokens_to_ids(content)
    if old_id is not None and new_id != old_id:
        raise ValueError(f"re-registering {content!r} moved it from id {old_id} to {new_id}")
    return new_id


def add_sesame_tokens(tokenizer, use_mm_start_end: bool = True) -> SpecialTokenIds:
    """Add the SESAME tokens (idempotent: existing ones keep their ids) and return their ids.
    pad is set to unk, as the original."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id != tokenizer.unk_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    _register(tokenizer, SEG_TOKEN, special=False)
    if use_mm_start_end:
        for token in (IM_START_TOKEN, IM_END_TOKEN):
            _register(tokenizer, token, special=True)
    vocab = tokenizer.get_vocab()
    seg = tokenizer(SEG_TOKEN, add_special_tokens=False).input_ids
    if seg != [vocab[SEG_TOKEN]]:
        raise ValueError(f"[SEG] must tokenise to one id, got {seg} (was it added after loading?)")
    return SpecialTokenIds(seg=vocab[SEG_TOKEN], im_start=vocab.get(IM_START_TOKEN, -1),
                           im_end=vocab.get(IM_END_TOKEN, -1), pad=tokenizer.pad_token_id,
                           bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def saved_added_tokens(directory: str) -> dict[str, int]:
    """Added tokens a tokenizer directory declares: `added_tokens.json` (what transformers 4.x
    writes) and `added_tokens_decoder` in tokenizer_config.json (5.x), as {content: id}."""
    tokens: dict[str, int] = {}
    path = os.path.join(directory, ADDED_TOKENS_FILE)
    if os.path.isfile(path):
        tokens.update({str(k): int(v) for k, v in _read_json(path).items()})
    cfg_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    if os.path.isfile(cfg_path):
        for idx, tok in (_read_json(cfg_path).get("added_tokens_decoder") or {}).items():
            content = tok["content"] if isinstance(tok, dict) else str(tok)
            tokens.setdefault(content, int(idx))
    return tokens


def load_tokenizer(path: str):
    """The slow-LLaMA tokenizer of a checkpoint or LLaVA base directory, with 4.31 semantics.

    Needs `tokenizer.model`; honours `added_tokens.json` ids (so `[SEG]` stays 32000 etc.); every
    added token is re-registered with the 4.31 whitespace behaviour; pad = unk. SESAME tokens that
    are missing (a LLaVA base) are NOT added here: call `add_sesame_tokens` for that.
    """
    from transformers import LlamaTokenizer

    model_file = os.path.join(path, TOKENIZER_MODEL)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"no sentencepiece tokenizer: {model_file} does not exist")
    declared = saved_added_tokens(path)
    tokenizer = LlamaTokenizer.from_pretrained(path, legacy=True, add_bos_token=True, add_eos_token=False)
    base_size = _sentencepiece_size(model_file)
    special_attrs = {str(t) for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token)}
    for content, idx in sorted(declared.items(), key=lambda item: item[1]):
        if idx < base_size or content in special_attrs:
            continue  # a sentencepiece piece (e.g. <s>), not an added token
        got = tokenizer.convert_tokens_to_ids(content)
        if got != idx:
            raise ValueError(f"{path}: added token {content!r} should have id {idx} but loads as {got} "
                             f"(ids must follow the {base_size} sentencepiece pieces without gaps)")
        _register(tokenizer, content, special=content in (IM_START_TOKEN, IM_END_TOKEN))
    tokenizer.pad_token = tokenizer.unk_token
    _use_sentencepiece_dummy_prefix(tokenizer)
    return tokenizer


def _use_sentencepiece_dummy_prefix(tokenizer) -> None:
    """Prefix every text chunk with "▁" exactly as sentencepiece does. transformers 5.x's legacy
    Metaspace skips the prefix when a chunk already starts with a space (" b" -> "▁b", where
    sentencepiece and 4.31 give "▁", "▁b"); a Prepend normalizer runs per chunk and does not."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None


def _sentencepiece_size(model_file: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=model_file).get_piece_size()


def save_slow_tokenizer(tokenizer, out_dir: str, model_max_length: int = 512) -> list[str]:
    """Write the four files of the released layout (what transformers 4.31's slow LlamaTokenizer
    saves): tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json."""
    import shutil

    src = getattr(tokenizer, "vocab_file", None)
    if not src or not os.path.isfile(src):
        raise ValueError("the tokenizer does not know its sentencepiece file (tokenizer.vocab_file is "
                         f"{src!r}); load it with model.tokenizer.load_tokenizer")
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, TOKENIZER_MODEL)
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copyfile(src, dst)
    base_size = _sentencepiece_size(dst)

    def special(token: str) -> dict:
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    bos, eos, unk = str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.unk_token)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **special(bos)},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **special(eos)},
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **special(unk)},
    }
    special_map = {"bos_token": special(bos), "eos_token": special(eos), "pad_token": str(tokenizer.pad_token),
                   "unk_token": special(unk)}
    added = {content: idx for content, idx in tokenizer.get_vocab().items() if idx >= base_size}
    written = [dst]
    for name, payload in ((TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_MAP_FILE, special_map),
                          (ADDED_TOKENS_FILE, dict(sorted(added.items())))):
        file = os.path.join(out_dir, name)
        with open(file, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, ensure_ascii=False)
            f.write("\n")
        written.append(file)
    return written
