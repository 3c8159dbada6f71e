"""The llava_v1 conversation format SESAME was trained with, and image-aware tokenisation.

A prompt looks like
    "{system} USER: <im_start><image><im_end>\n{question} ASSISTANT: {answer}</s>"
and at inference ends in "ASSISTANT:". `<image>` is not a vocabulary entry: it becomes the
placeholder id IMAGE_TOKEN_INDEX, where the model later splices the projected CLIP patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

# Both system prompts of the original. Training used "curious human" (llava_v1); the original's
# evaluation and demo silently ran with "curious user" (vicuna_v1). Both are kept by name.
SYSTEM_PROMPTS = {
    "llava_v1": ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    "vicuna_v1": ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions."),
}
ROLES = ("USER", "ASSISTANT")
SEP = " "
SEP2 = "</s>"


@dataclass(frozen=True)
class Conversation:
    """A (possibly multi-turn) llava_v1 dialogue. `answers[-1]` may be None: the prompt then ends
    in "ASSISTANT:" for generation."""

    questions: Sequence[str]
    answers: Sequence[Optional[str]]
    template: str = "llava_v1"

    def __post_init__(self) -> None:
        if self.template not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown conversation template {self.template!r}; known: {sorted(SYSTEM_PROMPTS)}")
        if len(self.questions) != len(self.answers) or not self.questions:
            raise ValueError("a conversation needs one answer slot per question")

    def render(self) -> str:
        text = SYSTEM_PROMPTS[self.template] + SEP
        for i, (q, a) in enumerate(zip(self.questions, self.answers)):
            text += f"{ROLES[0]}: {q}{SEP}"
            if a is None:
                if i != len(self.questions) - 1:
                    raise ValueError("only the last answer may be left open")
                text += f"{ROLES[1]}:"
            else:
                text += f"{ROLES[1]}: {a}{SEP2}"
        return text


def wrap_image_token(text: str, use_mm_start_end: bool = True) -> str:
    """`<image>` -> `<im_start><image><im_end>` as the original prompts hold it."""
    if use_mm_start_end:
        return text.replace(IMAGE_TOKEN, "<im_start>" + IMAGE_TOKEN + "<im_end>")
    return text


def build_prompt(question: str, answer: Optional[str] = None, template: str = "llava_v1",
                 use_mm_start_end: bool = True) -> str:
    """One-turn prompt. `question` should start with "<image>\\n" (all SESAME templates do);
    if it does not contain `<image>`, it is prepended."""
    if IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN + "\n" + question
    return wrap_image_token(Conversation([question], [answer], template).render(), use_mm_start_end)


def tokenize_with_image(prompt: str, tokenizer) -> list[int]:
    """Token ids of `prompt` with each `<image>` replaced by IMAGE_TOKEN_INDEX.

    Each text chunk around `<image>` is tokenised on its own (as LLaVA does): the first keeps its
    BOS, later chunks lose theirs. This exact chunking decides the ids the released checkpoints saw.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if i > 0 and chunk and chunk[0] == bos:
            chunk = chunk[1:]
        ids.extend(chunk)
    return ids
