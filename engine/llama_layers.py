"""transformers' LLaMA decoder layers, step by step, for the batched engine (`engine/batched.py`).

The engine owns attention and the KV cache (a prefix shared between batch rows has no place in
transformers' caches) and calls the layers' own modules for everything else. Where that is plain
`nn.Linear` modules it runs fewer, larger kernels, with the same arithmetic:

- q/k/v projections as one matrix product, once `pack_qkv` has moved the three weights into one
  tensor (the modules' parameters become views of it: same values, same modules, no extra memory).
  Other modules (LoRA-wrapped, quantised) are called one by one.
- gate/up projections likewise, once `pack_gate_up` has packed them (where the activation is SiLU):
  one matrix product, then the SiLU and the product of its two strided halves in one kernel on CUDA
  in bf16 / fp16 (engine/fused_kernels.py), two elsewhere; then the layer's own down_proj module.
- the rotary embedding of q and k together, in place: one kernel on CUDA, four elsewhere, instead
  of ten.
- RMSNorm with its weight product: one kernel on CUDA in bf16 / fp16, two elsewhere (transformers'
  rounding: normalise in float32, round to the input dtype, then multiply by the weight).
- the logits through a vocabulary padded to a multiple of 64 rows, once `pad_lm_head` has made
  lm_head's weight the first rows of a zero-padded tensor (`lm_head_logits`).

A decode step is bound by how fast the host issues kernels as much as by the GPU, so kernel count
is what this file is about.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_kernels, rotary_kernel


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm in one kernel on CUDA in bf16 / fp16 outside autograd, two
    elsewhere; other norm modules are called as they are."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or type(norm).__name__ != "LlamaRMSNorm":
        return norm(x)
    if (fused_kernels.available(x, norm.weight) and norm.weight.dtype == x.dtype
            and x.shape[-1] <= fused_kernels.MAX_WIDTH):
        return fused_kernels.rms_norm_weighted(x, norm.weight, eps)
    return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _plain_linears(modules: list[nn.Module]) -> bool:
    """Exactly nn.Linear (not a subclass such as a LoRA layer), one dtype and device, all with or all
    without bias."""
    if not all(type(m) is nn.Linear for m in modules):
        return False
    w0 = modules[0].weight
    same = all(m.weight.dtype == w0.dtype and m.weight.device == w0.device and m.in_features == modules[0].in_features
               for m in modules)
    return same and len({m.bias is None for m in modules}) == 1


def _pack(modules: list[nn.Module]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One (sum of out_features, in_features) weight (and bias); each module's parameters become
    views of it, in order."""
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    start = 0
    for m in modules:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:end], requires_grad=m.bias.requires_grad)
        start = end
    return weight, bias


PACKED_QKV = "packed_qkv"  # attribute of a packed attention module: (weight, bias or None)
PACKED_GATE_UP = "packed_gate_up"  # attribute of a packed MLP module: (weight, bias or None)


def _packed(module: nn.Module, key: str, first: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """module's packed (weight, bias) under `key` while `first`'s weight still is a view of it, else
    None (the model was moved or the parameters replaced since)."""
    packed = module.__dict__.get(key)
    if packed is None or first.weight.data_ptr() != packed[0].data_ptr():
        return None
    return packed


def _pack_each_layer(decoder: nn.Module, part: str, names: tuple[str, ...], key: str,
                     allowed: Optional[Callable[[nn.Module], bool]] = None) -> int:
    """In each decoder layer's `part` module, the weights of projections `names` packed into one tensor
    (a plain attribute under `key`: not a parameter or buffer), where they are plain nn.Linear and
    `allowed(module)` (when given). Returns the number of layers packed."""
    packed = 0
    for layer in decoder.layers[:decoder.config.num_hidden_layers]:
        module = getattr(layer, part)
        projections = [getattr(module, name) for name in names]
        if (_packed(module, key, projections[0]) is None and (allowed is None or allowed(module))
                and _plain_linears(projections)):
            module.__dict__[key] = _pack(projections)
            packed += 1
    return packed


def pack_qkv(decoder: nn.Module) -> int:
    """Pack each decoder layer's q/k/v weights into one tensor, in place, once the model is on its
    final device and dtype (moving it afterwards gives the modules new tensors, and the layers then
    run unpacked, with the same results). Only plain nn.Linear projections are packed: LoRA-wrapped
    or quantised ones stay as they are. Returns the number of layers packed."""
    return _pack_each_layer(decoder, "self_attn", ("q_proj", "k_proj", "v_proj"), PACKED_QKV)


def _packed_of(attn: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The packed (weight, bias) of a layer whose q/k/v parameters still are views of it, else None."""
    return _packed(attn, PACKED_QKV, attn.q_proj)


def _silu(mlp: nn.Module) -> bool:
    """LlamaMLP's act_fn is SiLU (config hidden_act "silu": transformers' SiLUActivation; nn.SiLU)."""
    return type(getattr(mlp, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU")


def pack_gate_up(decoder: nn.Module) -> int:
    """Pack each decoder layer's gate/up weights into one (2 * intermediate, hidden) tensor, in place,
    as `pack_qkv` does for q/k/v (same conditions: plain nn.Linear, final device and dtype), where the
    activation is SiLU. Returns the number of layers packed."""
    return _pack_each_layer(decoder, "mlp", ("gate_proj", "up_proj"), PACKED_GATE_UP, _silu)


def _gate_up_of(mlp: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The packed (weight, bias) of an MLP whose gate/up parameters still are views of it and whose
    activation still is SiLU, else None."""
    return _packed(mlp, PACKED_GATE_UP, mlp.gate_proj) if _silu(mlp) else None


PADDED_LM_HEAD = "padded_lm_head"  # attribute of a padded lm_head module: its (rows rounded up, hidden) weight


def pad_lm_head(llm: nn.Module, multiple: int = 64) -> bool:
    """lm_head's weight made the first rows of a (vocabulary rounded up to `multiple`, hidden) tensor
    whose extra rows are zero, in place (the parameter becomes a view: same values, 61 more rows of
    memory for LLaMA's 32003). Why: with a vocabulary that is not a multiple of 8 (SESAME adds three
    tokens to LLaMA's 32000) the logits' rows are misaligned and cuBLAS falls back to an old
    alignment-1 kernel, ~7x slower at a batched decode step (benchmarks/RESULTS.md).
    Only a plain bias-free nn.Linear not tied to the input embeddings is padded. Returns whether
    lm_head is padded now."""
    head = llm.lm_head
    if _padded_lm_head(head) is not None:
        return True
    if not _plain_linears([head]) or head.bias is not None or head.weight is llm.get_input_embeddings().weight:
        return False
    weight = head.weight.detach()
    vocab = weight.shape[0]
    padded = weight.new_zeros((-(-vocab // multiple) * multiple, weight.shape[1]))
    padded[:vocab] = weight
    head.weight = nn.Parameter(padded[:vocab], requires_grad=head.weight.requires_grad)
    head.__dict__[PADDED_LM_HEAD] = padded
    return True


def _padded_lm_head(head: nn.Module) -> Optional[torch.Tensor]:
    """The padded weight while lm_head's parameter still is a view of it, else None."""
    padded = head.__dict__.get(PADDED_LM_HEAD)
    if padded is None or head.weight.data_ptr() != padded.data_ptr():
        return None
    return padded


def lm_head_logits(llm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """llm.lm_head(hidden): through the padded weight where `pad_lm_head` made one (a view of the
    first vocabulary-size columns of the padded product), else through the module."""
    padded = _padded_lm_head(llm.lm_head)
    if padded is None:
        return llm.lm_head(hidden)
    return F.linear(hidden, padded)[..., :llm.lm_head.out_features]


class LlamaLayers:
    """The decoder layers of a LlamaModel, run with the packed projections where `pack_qkv` and
    `pack_gate_up` made them.

    heads / kv_heads / head_dim: of the attention; `qkv(i, h)` returns layer i's projections as one
    (B, L, heads + 2 * kv_heads, head_dim) tensor: query heads, then key heads, then value heads;
    `mlp(i, h)` returns layer i's MLP output."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.layers = list(decoder.layers[:decoder.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = decoder.config.num_attention_heads
        self.kv_heads = decoder.config.num_key_value_heads
        self._packed = [_packed_of(layer.self_attn) for layer in self.layers]
        self._gate_up = [_gate_up_of(layer.mlp) for layer in self.layers]

    @property
    def packed(self) -> bool:
        """Every layer's q/k/v packed."""
        return all(p is not None for p in self._packed)

    @property
    def gate_up_packed(self) -> bool:
        return all(p is not None for p in self._gate_up)

    def qkv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        packed = self._packed[i]
        if packed is not None:
            out = F.linear(h, *packed)
        else:
            a = self.layers[i].self_attn
            out = torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], dim=-1)
        return out.view(*h.shape[:-1], self.heads + 2 * self.kv_heads, self.head_dim)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) -> (..., H): down_proj(silu(gate_proj(h)) * up_proj(h)); unpacked layers (LoRA,
        quantised, other activations) call their MLP module."""
        packed = self._gate_up[i]
        if packed is None:
            return self.layers[i].mlp(h)
        gate_up = F.linear(h, *packed)
        half = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :half], gate_up[..., half:]
        if fused_kernels.available(gate_up):
            act = fused_kernels.silu_mul(gate, up)
        else:
            act = F.silu(gate) * up
        return self.layers[i].mlp.down_proj(act)


def rotary_tables(decoder: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each (B, L, 1, head_dim), for `rotate_`: the model's own rotary embedding,
    with the sign of rotate_half moved into the sine table."""
    cos, sin = decoder.rotary_emb(x, positions)
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, :, None], signed[:, :, None]


def rotate_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """transformers' `x * cos + rotate_half(x) * sin`, in place on x (B, L, heads, d), bit for bit:
    rotate_half(x) * sin = cat(-x2, x1) * sin = cat(x2, x1) * cat(-sin1, sin2), as negation is exact.
    One Triton kernel on CUDA (model/rotary_kernel.py), four PyTorch calls elsewhere."""
    if rotary_kernel.available(x):
        rotary_kernel.rotate_triton_(x, cos, signed_sin)
        return
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    swapped.mul_(signed_sin)
    x.mul_(cos)
    x.add_(swapped)
