"""The released tokenizer files load with the ids the original code produced (slow LlamaTokenizer,
transformers 4.31, legacy=True), checked token for token against sentencepiece itself."""
import json
import os
import shutil

import pytest
import sentencepiece as spm

from model.conversation import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, build_prompt, tokenize_with_image
from model.tokenizer import add_sesame_tokens, load_tokenizer, save_slow_tokenizer

SESAME_TOKENS = {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}


def _added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_431_tokenizer(directory, sp_model, added=None):
    """The four files transformers 4.31 writes for SESAME's tokenizer (by hand, not by our code)."""
    os.makedirs(directory, exist_ok=True)
    shutil.copyfile(sp_model, os.path.join(directory, "tokenizer.model"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": _added_token("</s>"), "legacy": False,
              "model_max_length": 512, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": _added_token("<unk>")}
    special = {k: {f: v for f, v in _added_token(c).items() if f != "__type"}
               for k, c in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    special["pad_token"] = "<unk>"
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(payload, f)
    if added is not None:
        with open(os.path.join(directory, "added_tokens.json"), "w") as f:
            json.dump(added, f)
    return directory


def slow_431_ids(sp, text, added):
    """What 4.31's slow legacy LlamaTokenizer gives: split on added and special tokens (longest
    match first), strip the whitespace next to added tokens (not next to <s>, </s>, <unk>, which
    are AddedToken special attributes), encode each text chunk with sentencepiece (dummy prefix)."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab = {**specials, **added}
    parts, start, i = [], 0, 0
    while i < len(text):
        match = max((t for t in vocab if text.startswith(t, i)), key=len, default=None)
        if match is None:
            i += 1
            continue
        parts += [("text", text[start:i]), ("token", match)]
        i = start = i + len(match)
    parts.append(("text", text[start:]))
    for k, (kind, value) in enumerate(parts):
        if kind == "token" and value in added:
            if k > 0:
                parts[k - 1] = ("text", parts[k - 1][1].rstrip())
            if k + 1 < len(parts):
                parts[k + 1] = ("text", parts[k + 1][1].lstrip())
    ids = [1]
    for kind, value in parts:
        if kind == "token":
            ids.append(vocab[value])
        elif value:
            ids.extend(sp.encode(value))
    return ids


@pytest.fixture(scope="module")
def released_tokenizer_dir(tmp_path_factory, sp_model):
    return write_431_tokenizer(str(tmp_path_factory.mktemp("released_tok")), sp_model, SESAME_TOKENS)


TEXTS = [
    "[SEG].",
    "Sure, [SEG].",
    "a [SEG] .",
    "x  \t[SEG]\n\ny",
    "[SEG][SEG] and [SEG]",
    "USER: <im_start><im_end>\nIs there a cat? ASSISTANT:",
    "<im_end>\n\n  the left zebra",
    "Sure, it is [SEG].</s>USER: and the dog? ASSISTANT: No, there is no dog.</s>",
    "a </s> b <s> c <unk>",
    "  leading and trailing  ",
    "tabs\tand\nnew lines\n",
    "digits 12345 and (brackets) [not seg] [SEG",
    "unicode caf\u00e9 \u00fcber \u4e2d\u6587 \U0001F600",
    "",
]


@pytest.fixture(scope="module")
def released_tok(released_tokenizer_dir):
    return load_tokenizer(released_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_431_slow_legacy(released_tok, sp_model, text):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert released_tok(text).input_ids == slow_431_ids(sp, text, SESAME_TOKENS)


def test_prompt_with_image_matches_431(released_tokenizer_dir, sp_model):
    tok = load_tokenizer(released_tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    prompt = build_prompt("<image>\nCan you confirm if the man in red is present?", "Sure, [SEG].")
    expected = []
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        ids = slow_431_ids(sp, chunk, SESAME_TOKENS)
        expected += ([IMAGE_TOKEN_INDEX] + ids[1:]) if i else ids
    got = tokenize_with_image(prompt, tok)
    assert got == expected
    # the space before <im_start> and the newline after <im_end> are gone, as in 4.31
    k = got.index(IMAGE_TOKEN_INDEX)
    assert got[k - 1] == 32001 and got[k + 1] == 32002 and got[k + 2] == sp.encode("Can")[0]


def test_ids_order_specialness_and_pad(released_tokenizer_dir, tmp_path, sp_model):
    tok = load_tokenizer(released_tokenizer_dir)
    ids = add_sesame_tokens(tok)
    assert (ids.seg, ids.im_start, ids.im_end, ids.pad, ids.bos, ids.eos) == (32000, 32001, 32002, 0, 1, 2)
    assert len(tok) == 32003 and tok.pad_token_id == tok.unk_token_id == 0
    # [SEG] is not special (survives skip_special_tokens); the image delimiters are
    text = tok.decode(tok("Sure, [SEG]. <im_start>x").input_ids, skip_special_tokens=True)
    assert "[SEG]" in text and "<im_start>" not in text
    # added_tokens.json listed in another order: ids still follow the file
    shuffled = write_431_tokenizer(str(tmp_path / "shuffled"), sp_model,
                                   {"<im_end>": 32002, "[SEG]": 32000, "<im_start>": 32001})
    assert [load_tokenizer(shuffled).convert_tokens_to_ids(t) for t in SESAME_TOKENS] == [32000, 32001, 32002]


def test_base_tokenizer_gets_tokens_in_released_order(tmp_path, sp_model, released_tokenizer_dir):
    base = load_tokenizer(write_431_tokenizer(str(tmp_path / "llava"), sp_model))
    assert len(base) == 32000
    ids = add_sesame_tokens(base)
    assert (ids.seg, ids.im_start, ids.im_end) == (32000, 32001, 32002)
    released = load_tokenizer(released_tokenizer_dir)
    for text in TEXTS:
        assert base(text).input_ids == released(text).input_ids
    assert add_sesame_tokens(base) == ids  # idempotent


def test_save_slow_tokenizer_round_trip(released_tokenizer_dir, tmp_path):
    tok = load_tokenizer(released_tokenizer_dir)
    out = str(tmp_path / "saved")
    save_slow_tokenizer(tok, out)
    assert sorted(os.listdir(out)) == ["added_tokens.json", "special_tokens_map.json", "tokenizer.model",
                                       "tokenizer_config.json"]
    with open(os.path.join(out, "added_tokens.json")) as f:
        assert json.load(f) == SESAME_TOKENS
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["bos_token"]["content"] == "<s>"
    again = load_tokenizer(out)
    for text in TEXTS:
        assert again(text).input_ids == tok(text).input_ids


def test_tokenizer_errors(tmp_path, sp_model):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model"):
        load_tokenizer(str(tmp_path))
    gap = write_431_tokenizer(str(tmp_path / "gap"), sp_model, {"[SEG]": 32005})
    with pytest.raises(ValueError, match=r"\[SEG\].*32005"):
        load_tokenizer(gap)
