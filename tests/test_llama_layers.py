"""engine/llama_layers.py: the engine's step-by-step LLaMA layers compute what transformers' do."""
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.llama_layers import (
    LlamaLayers,
    lm_head_logits,
    pack_gate_up,
    pack_qkv,
    pad_lm_head,
    rms_norm,
    rotary_tables,
    rotate_,
)


def _llama(kv_heads=2, bias=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias, max_position_embeddings=64)
    model = LlamaModel(cfg).to(dtype).eval()
    for p in model.parameters():  # nonzero biases and norm weights, so a slip in packing shows
        nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_bit_exact(dtype):
    model = _llama(dtype=dtype)
    torch.manual_seed(1)
    q = torch.randn(3, 5, 4, 8, dtype=dtype)  # (B, L, heads, d)
    k = torch.randn(3, 5, 2, 8, dtype=dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [30, 2, 5, 1, 0]])
    cos, sin = model.rotary_emb(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qk = torch.cat([q, k], dim=2)
    rotate_(qk, *rotary_tables(model, q, positions))
    assert torch.equal(qk[:, :, :4], want_q.transpose(1, 2))
    assert torch.equal(qk[:, :, 4:], want_k.transpose(1, 2))


def _pack_keeping_the_model(model, pack) -> None:
    """pack(model) packs both layers, and only once; the parameters keep their names and values (the
    projections become views of one tensor per layer and group), and the model its outputs."""
    ids = torch.randint(0, 50, (2, 7))
    before = model(input_ids=ids).last_hidden_state
    separate = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert pack(model) == 2
    assert pack(model) == 0  # once
    after = dict(model.named_parameters())
    assert after.keys() == separate.keys()
    for name, p in after.items():
        assert torch.equal(p, separate[name]), name
    assert torch.equal(model(input_ids=ids).last_hidden_state, before)


@pytest.mark.parametrize("bias", [False, True])
def test_packing_keeps_the_model_and_its_outputs(bias):
    model = _llama(bias=bias)
    _pack_keeping_the_model(model, pack_qkv)
    layers = LlamaLayers(model)
    assert layers.packed
    attn = model.layers[0].self_attn
    base = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == base == attn.v_proj.weight.untyped_storage().data_ptr()
    # the packed products equal the modules' own
    h = torch.randn(2, 7, 32)
    qkv = layers.qkv(0, h)
    assert qkv.shape == (2, 7, 4 + 2 * 2, 8)
    want = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1).view(2, 7, 8, 8)
    torch.testing.assert_close(qkv, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rms_norm(model.layers[0].input_layernorm, h), model.layers[0].input_layernorm(h))


def test_lora_wrapped_projections_are_called_as_they_are():
    from peft import LoraConfig, get_peft_model

    model = _llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)  # a LoRA delta that changes the outputs
    decoder = peft_model.base_model.model
    assert pack_qkv(decoder) == 0  # q/v are LoRA layers
    layers = LlamaLayers(decoder)
    assert not layers.packed
    attn = decoder.layers[1].self_attn
    h = torch.randn(1, 3, 32)
    want = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1).view(1, 3, 8, 8)
    torch.testing.assert_close(layers.qkv(1, h), want)


def test_no_packing_unless_asked_and_none_after_a_move():
    model = _llama()
    layers = LlamaLayers(model)
    assert not layers.packed
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    # moving a packed model gives its modules new tensors: the layers then run unpacked, correctly
    pack_qkv(model)
    model.to(torch.float64)
    layers = LlamaLayers(model)
    assert not layers.packed
    h = torch.randn(1, 3, 32, dtype=torch.float64)
    want = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1).view(1, 3, 8, 8)
    torch.testing.assert_close(layers.qkv(0, h), want)


@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_packing_keeps_the_model_and_its_outputs(bias):
    model = _llama(bias=bias)
    _pack_keeping_the_model(model, pack_gate_up)
    layers = LlamaLayers(model)
    assert layers.gate_up_packed and not layers.packed  # q/k/v are packed on their own
    mlp = model.layers[1].mlp
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    h = torch.randn(2, 7, 32)
    for i, layer in enumerate(model.layers):
        torch.testing.assert_close(layers.mlp(i, h), layer.mlp(h), atol=1e-5, rtol=1e-5)


def test_lora_wrapped_or_other_activation_mlps_are_called_as_they_are():
    from peft import LoraConfig, get_peft_model

    model = _llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.0\.mlp\.up_proj"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    decoder = peft_model.base_model.model
    assert pack_gate_up(decoder) == 1  # layer 1 only: layer 0's up_proj is a LoRA layer
    layers = LlamaLayers(decoder)
    assert not layers.gate_up_packed
    h = torch.randn(1, 3, 32)
    for i, layer in enumerate(decoder.layers):
        torch.testing.assert_close(layers.mlp(i, h), layer.mlp(h), atol=1e-5, rtol=1e-5)
    other = _llama()
    for layer in other.layers:
        layer.mlp.act_fn = nn.GELU()
    assert pack_gate_up(other) == 0


def test_a_moved_model_runs_its_mlps_unpacked():
    model = _llama()
    pack_gate_up(model)
    model.to(torch.float64)
    layers = LlamaLayers(model)
    assert not layers.gate_up_packed
    h = torch.randn(1, 3, 32, dtype=torch.float64)
    torch.testing.assert_close(layers.mlp(0, h), model.layers[0].mlp(h))


def _causal_lm(vocab: int, tie: bool = False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def test_padded_lm_head_keeps_the_model_and_its_logits():
    llm = _causal_lm(vocab=53)  # not a multiple of 8, as SESAME's 32003
    ids = torch.randint(0, 53, (2, 5))
    before = llm(input_ids=ids).logits
    weight = llm.lm_head.weight.detach().clone()
    hidden = torch.randn(3, 4, 32)
    want = llm.lm_head(hidden)
    assert pad_lm_head(llm) and pad_lm_head(llm)  # padded once; asking again keeps it
    head = llm.lm_head
    padded = head.__dict__["padded_lm_head"]
    assert padded.shape == (64, 32) and torch.equal(padded[53:], torch.zeros(11, 32))
    assert head.weight.data_ptr() == padded.data_ptr() and torch.equal(head.weight, weight)
    assert dict(llm.named_parameters()).keys() == {n for n, _ in _causal_lm(53).named_parameters()}
    logits = lm_head_logits(llm, hidden)
    assert logits.shape == (3, 4, 53)
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(llm(input_ids=ids).logits, before)
    # a model moved since (new tensors) runs through its module again
    llm.to(torch.float64)
    assert torch.equal(lm_head_logits(llm, hidden.double()), llm.lm_head(hidden.double()))


def test_tied_or_wrapped_lm_heads_are_not_padded():
    tied = _causal_lm(vocab=53, tie=True)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert not pad_lm_head(tied)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    hidden = torch.randn(2, 32)
    assert torch.equal(lm_head_logits(tied, hidden), tied.lm_head(hidden))
    wrapped = _causal_lm(vocab=53)
    wrapped.lm_head = nn.Sequential(wrapped.lm_head)  # not exactly nn.Linear
    wrapped.lm_head.out_features = 53
    assert not pad_lm_head(wrapped)
