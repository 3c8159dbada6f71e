"""Greedy decoding with a KV cache that also collects the [SEG] hidden states.

The original decodes without a cache so that the last step's hidden states cover the whole
sequence, and then picks the state just before each [SEG]. Here the same state is recorded at the
step that *emits* [SEG]: the final-norm hidden state of the position whose next-token prediction is
[SEG]. That is the identical vector, at O(T) instead of O(T^2) cost.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import LlamaModel

# transformers renamed LlamaModel.forward's `past_key_values` (and the output field) to `cache`; the
# old name is deprecated and goes in 5.40. Use whichever the installed version has.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

# (step, logits (B, V) float32) -> logits. Used by tests and benchmarks to force tokens.
LogitsHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class GreedyOutput:
    tokens: list[list[int]]  # generated ids per row, up to and including EOS
    seg_hidden: list[torch.Tensor]  # per row (n_seg, H): states that predicted each [SEG]
    prefill_hidden: Optional[torch.Tensor]  # (B, L, H) final-norm states of the prompt, if kept


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding anywhere in the row (left, right or in the middle)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_generate(
    llm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    seg_token_id: int,
    logits_hook: Optional[LogitsHook] = None,
    keep_prefill_hidden: bool = False,
) -> GreedyOutput:
    """Greedy decoding of a LlamaForCausalLM from (left-padded) input embeddings (B, L, H) and their
    attention mask (B, L)."""
    batch = inputs_embeds.shape[0]
    decoder, lm_head, embed = llm.model, llm.lm_head, llm.get_input_embeddings()
    position_ids = positions_from_mask(attention_mask)
    out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=True)
    cache = getattr(out, CACHE_ARG)
    prefill_hidden = out.last_hidden_state if keep_prefill_hidden else None
    hidden = out.last_hidden_state[:, -1]
    next_pos = position_ids[:, -1:] + 1

    tokens: list[list[int]] = [[] for _ in range(batch)]
    seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
    for step in range(max_new_tokens):
        logits = lm_head(hidden).float()
        if logits_hook is not None:
            logits = logits_hook(step, logits)
        next_ids = logits.argmax(-1)
        next_list = next_ids.tolist()
        for row in range(batch):
            if finished[row]:
                continue
            tokens[row].append(next_list[row])
            if next_list[row] == seg_token_id:
                seg_hidden[row].append(hidden[row])
        finished |= next_ids == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        out = decoder(inputs_embeds=embed(next_ids[:, None]), attention_mask=attention_mask, position_ids=next_pos,
                      use_cache=True, **{CACHE_ARG: cache})
        cache = getattr(out, CACHE_ARG)
        hidden = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1

    width = inputs_embeds.shape[-1]
    stacked = [torch.stack(h) if h else inputs_embeds.new_zeros(0, width) for h in seg_hidden]
    return GreedyOutput(tokens=tokens, seg_hidden=stacked, prefill_hidden=prefill_hidden)
