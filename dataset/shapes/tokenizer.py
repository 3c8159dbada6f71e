"""A small tokenizer for the shapes world, in the released slow-tokenizer layout.

    python -m dataset.shapes.tokenizer OUT_DIR [--vocab_size 1000]

A byte-fallback BPE sentencepiece model (LLaMA's conventions: unk 0, bos 1, eos 2) trained on
everything a shapes model reads or writes: both system prompts, the roles, every question and
answer template (ours and LISA's fixed prompts), and the expressions, false premises, corrections
and VQA conversations of a few thousand scenes. Then `[SEG]`, `<im_start>`, `<im_end>` are added as
in the released checkpoints (`model.tokenizer.add_sesame_tokens`) and the four files are written
(`tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`).
"""
from __future__ import annotations

import argparse
from typing import Iterator

import numpy as np

from model.conversation import ROLES, SYSTEM_PROMPTS

from ..templates import DEFAULT_TEMPLATES, LISA_EVAL
from .language import candidate_expressions, false_premises, pick_expressions, vqa_rounds
from .scene import make_scene

DEFAULT_VOCAB_SIZE = 1000
_NOT_TEXT = ("<image>", "[SEG]", "<im_start>", "<im_end>")  # placeholders and added tokens


def _clean(text: str) -> str:
    for token in _NOT_TEXT:
        text = text.replace(token, " ")
    return " ".join(text.split())


def world_sentences(rng: np.random.Generator, scenes: int) -> Iterator[tuple[str, str]]:
    """(expression, name of a present object) pairs and VQA lines of `scenes` scenes."""
    for _ in range(scenes):
        scene = make_scene(rng)
        for j, obj in enumerate(scene.objects):
            for expr in pick_expressions(rng, candidate_expressions(scene, j), 4):
                yield expr.text(), obj.name
            for premise in false_premises(rng, scene, j):  # plain ones: the corpus as it was (same words)
                yield premise.expression.text(), premise.gt_sent
        for question, answer in vqa_rounds(rng, scene):
            yield question, answer


def corpus(scenes: int = 1000, seed: int = 0) -> list[str]:
    """Every line the tokenizer is trained on."""
    rng = np.random.default_rng(seed)
    lines = [f"{system} {ROLES[0]}: {ROLES[1]}:" for system in SYSTEM_PROMPTS.values()]
    t = DEFAULT_TEMPLATES
    for expr, name in world_sentences(rng, scenes):
        lines.append(expr)
        lines.append(name)
        fill = {"class_name": expr, "gt_name": name, "sent": expr}
        for entries in (t.short_question, t.short_answer, t.neg_answer, t.correct_answer, t.long_question):
            lines.append(entries[int(rng.integers(len(entries)))].format(**fill))
    for entries in (t.short_question, t.long_question, t.short_answer, t.long_answer, t.neg_answer, t.correct_answer):
        lines += [e.format(class_name="red circle", gt_name="blue star", sent="Where is the star?") for e in entries]
    lines += [LISA_EVAL.short_question.format(class_name="red circle"), LISA_EVAL.long_question.format(sent="Where?"),
              LISA_EVAL.answer]
    return [_clean(line) for line in lines]


def write_tokenizer(out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE, scenes: int = 1000, seed: int = 0):
    """Train and write the tokenizer; returns (tokenizer, model.tokenizer.SpecialTokenIds)."""
    from model.tiny import train_sentencepiece
    from model.tokenizer import add_sesame_tokens, load_tokenizer, save_slow_tokenizer

    train_sentencepiece(out_dir, corpus(scenes, seed), vocab_size)
    tokenizer = load_tokenizer(out_dir)
    ids = add_sesame_tokens(tokenizer)
    save_slow_tokenizer(tokenizer, out_dir)
    return tokenizer, ids


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataset.shapes.tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="sentencepiece pieces")
    p.add_argument("--scenes", type=int, default=1000, help="scenes whose text the tokenizer is trained on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tokenizer, ids = write_tokenizer(args.out_dir, args.vocab_size, args.scenes, args.seed)
    print(f"tokenizer with {len(tokenizer)} tokens ([SEG]={ids.seg}, <im_start>={ids.im_start}, "
          f"<im_end>={ids.im_end}) in {args.out_dir}")


if __name__ == "__main__":
    main()
