"""The released checkpoint layout (SESAME, SESAME-, READ, LISA): key names, weight files, loading
into a model built on the meta device, and saving in the same layout.

Released keys <-> SesameModel names (one-to-one, see model/sesame.py):
    model.{embed_tokens,layers,norm}.*  <-> llm.model.*        lm_head.weight <-> llm.lm_head.weight
    model.mm_projector.*                <-> mm_projector.*     model.visual_model.* <-> visual_model.*
    model.text_hidden_fcs.*             <-> text_hidden_fcs.*
`*.rotary_emb.inv_freq` (written by transformers 4.31) is ignored: transformers recomputes it.
`model.vision_tower.*` (LLaVA bases carry CLIP) is ignored too: like the original, CLIP always
comes from the config's `vision_tower` (hub id or directory), never from these files.

Loading never makes a full-precision copy of the model: parameters start on the meta device and
each shard's tensors are converted one by one straight to the target device and dtype, then
assigned. Buffers that the files do not hold (RoPE frequencies, SAM's pixel mean/std) are built
normally on the CPU and stay float32, as does SAM's positional Gaussian (a buffer in the files).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from .config import RELEASED_ARCHITECTURES
from .sesame import SesameModel

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "10GB"  # what transformers 4.31 used for the releases
INIT_STD = 0.02  # LLaMA initializer_range: how 4.31 initialised rows added by resize_token_embeddings


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into (keys, shapes, files, config)."""


# --- key layout --------------------------------------------------------------------------------
_RELEASED_TO_INTERNAL = (
    ("model.embed_tokens.", "llm.model.embed_tokens."),
    ("model.layers.", "llm.model.layers."),
    ("model.norm.", "llm.model.norm."),
    ("lm_head.", "llm.lm_head."),
    ("model.mm_projector.", "mm_projector."),
    ("model.visual_model.", "visual_model."),
    ("model.text_hidden_fcs.", "text_hidden_fcs."),
)
IGNORED_PREFIXES = ("model.vision_tower.",)


def released_to_internal(key: str) -> Optional[str]:
    """SesameModel state-dict name of a released key; None when the key is deliberately ignored;
    the key itself (which the model will not know) when it belongs to nothing."""
    if key.endswith("rotary_emb.inv_freq") or key.startswith(IGNORED_PREFIXES):
        return None
    for released, internal in _RELEASED_TO_INTERNAL:
        if key.startswith(released):
            return internal + key[len(released):]
    return key


def internal_to_released(name: str) -> Optional[str]:
    """Released key of a SesameModel state-dict name; None for CLIP (not part of released files)."""
    for released, internal in _RELEASED_TO_INTERNAL:
        if name.startswith(internal):
            return released + name[len(internal):]
    return None


_GROUPS = (
    ("llm.", "LLM"),
    ("mm_projector.", "projector"),
    ("visual_model.image_encoder.", "SAM image encoder"),
    ("visual_model.prompt_encoder.", "SAM prompt encoder"),
    ("visual_model.mask_decoder.", "SAM mask decoder"),
    ("text_hidden_fcs.", "text_hidden_fcs"),
    ("vision_tower.", "CLIP"),
)


def key_group(internal_name: str) -> str:
    for prefix, group in _GROUPS:
        if internal_name.startswith(prefix):
            return group
    return "other"


def describe_keys(pairs: Iterable[tuple[str, str]], limit: int = 6) -> str:
    """'LLM (2): a, b; SAM mask decoder (1): c' from (shown key, internal name) pairs."""
    groups: dict[str, list[str]] = {}
    for shown, internal in pairs:
        groups.setdefault(key_group(internal), []).append(shown)
    parts = []
    for group, keys in groups.items():
        keys = sorted(keys)
        more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
        parts.append(f"{group} ({len(keys)}): {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


# --- weight files ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFiles:
    directory: str
    format: str  # "safetensors" or "bin"
    files: tuple[str, ...]  # absolute paths, one per shard


def find_weight_files(directory: str) -> WeightFiles:
    """The weights of a checkpoint directory: sharded or single, safetensors preferred over .bin."""
    for fmt, single, index in (("safetensors", SAFE_FILE, SAFE_INDEX), ("bin", BIN_FILE, BIN_INDEX)):
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
            if missing:
                raise CheckpointError(f"{index_path} names shards that do not exist: "
                                      f"{', '.join(os.path.join(directory, s) for s in missing)}")
            return WeightFiles(directory, fmt, tuple(os.path.join(directory, s) for s in shards))
        if os.path.isfile(os.path.join(directory, single)):
            return WeightFiles(directory, fmt, (os.path.join(directory, single),))
    raise FileNotFoundError(f"no weights in {directory}: looked for {SAFE_INDEX}, {SAFE_FILE}, {BIN_INDEX}, "
                            f"{BIN_FILE}")


def load_pickle_checkpoint(path: str) -> dict:
    """A .bin / .pth state dict, safely (`weights_only`: tensors and plain containers, no code) and
    memory-mapped where the format allows (not the pre-zip legacy format)."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a weights-only PyTorch state dict (refusing to unpickle arbitrary "
                              f"objects): {first}") from e


def iter_shards(weights: WeightFiles, device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """One shard at a time (lazily read: safetensors per tensor, .bin memory-mapped)."""
    for path in weights.files:
        if weights.format == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt", device=str(device)) as f:
                yield _LazySafetensors(f)
        else:
            state = load_pickle_checkpoint(path)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
            yield state
            del state


class _LazySafetensors:
    """dict-like view that reads a tensor only when asked."""

    def __init__(self, handle):
        self._f = handle

    def keys(self):
        return list(self._f.keys())

    def items(self):
        for k in self._f.keys():
            yield k, self._f.get_tensor(k)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())


def read_shapes(weights: WeightFiles) -> dict[str, tuple[int, ...]]:
    """Every key's shape, without reading tensor data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, shard in zip(weights.files, iter_shards(weights)):
        if isinstance(shard, _LazySafetensors):
            for k in shard.keys():
                shapes[k] = shard.shape(k)
        else:
            for k, v in shard.items():
                if not isinstance(v, torch.Tensor):
                    raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
                shapes[k] = tuple(v.shape)
    return shapes


# --- loading into a meta-built model -----------------------------------------------------------
def build_on_meta(build: Callable[[], SesameModel]) -> SesameModel:
    """Run `build` with parameters on the meta device (no memory, no init cost); buffers are built
    normally on the CPU, so the non-persistent ones (RoPE, SAM pixel mean/std) come out right.
    The caller's random state is left untouched."""
    from accelerate import init_empty_weights

    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        return build()


@dataclass
class LoadPlan:
    source: str  # what is being loaded, for messages
    mapping: dict[str, str]  # file key -> SesameModel name
    grown: dict[str, int]  # SesameModel name -> rows in the file, for rows to add (new tokens)


def plan_loading(model: SesameModel, shapes: dict[str, tuple[int, ...]], source: str, *,
                 to_internal: Callable[[str], Optional[str]], provides: tuple[str, ...],
                 growable: tuple[str, ...] = (), to_file: Optional[Callable[[str], str]] = None) -> LoadPlan:
    """Match file keys to the model before reading any data; raise one CheckpointError listing
    every missing and unexpected key (by group) and every shape mismatch.

    provides: SesameModel name prefixes this source must cover completely.
    growable: names whose first dimension may be smaller in the file (rows added for new tokens).
    to_file: how a missing SesameModel name is spelled in this file (default: the released key).
    """
    to_file = to_file or (lambda n: internal_to_released(n) or n)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name.startswith(provides)}
    mapping, grown, unexpected, mismatched, seen = {}, {}, [], [], set()
    for key, shape in shapes.items():
        name = to_internal(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append((key, name))
            continue
        seen.add(name)
        want = expected[name]
        if shape != want:
            if name in growable and len(shape) == len(want) and shape[1:] == want[1:] and shape[0] < want[0]:
                grown[name] = shape[0]
            else:
                mismatched.append(f"{key}: checkpoint {list(shape)} vs model {list(want)}")
                continue
        mapping[key] = name
    missing = [name for name in expected if name not in seen]
    problems = []
    if missing:
        problems.append(f"missing keys: {describe_keys((to_file(n), n) for n in missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {describe_keys(unexpected)}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(sorted(mismatched)))
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    return LoadPlan(source, mapping, grown)


def load_planned(model: SesameModel, weights: Iterable[dict[str, torch.Tensor]], plan: LoadPlan, *,
                 device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Read shard by shard, convert each tensor straight to (device, dtype) and assign it.
    Floating buffers stay float32. Grown tensors get their extra rows from N(0, INIT_STD)."""
    buffers = {name for name, _ in model.named_buffers()}
    targets = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    for shard in weights:
        batch = {}
        for key, tensor in shard.items():
            name = plan.mapping.get(key)
            if name is None:
                continue
            target_dtype = (torch.float32 if name in buffers else dtype) if tensor.is_floating_point() else tensor.dtype
            value = tensor.to(device=device, dtype=target_dtype)
            if value.data_ptr() == tensor.data_ptr():
                # no conversion happened: own the memory instead of pointing into the memory-mapped
                # shard (a later rewrite of that file must not change or truncate the model)
                value = value.clone()
            if name in plan.grown:
                rows = targets[name][0] - tensor.shape[0]
                extra = torch.empty((rows, *tensor.shape[1:]), dtype=torch.float32).normal_(0.0, INIT_STD,
                                                                                            generator=generator)
                value = torch.cat([value, extra.to(device=device, dtype=target_dtype)])
            batch[name] = value
        model.load_state_dict(batch, strict=False, assign=True)
        del batch


def finish_loading(model: SesameModel, device: str | torch.device, source: str) -> SesameModel:
    """Check that nothing is left on the meta device, then move the CPU-built buffers over."""
    left = [(internal_to_released(n) or n, n) for n, p in model.named_parameters() if p.is_meta]
    left += [(n, n) for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"{source}: these were never loaded: {describe_keys(left)}")
    return model.to(device)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating parameters to `dtype`; buffers keep float32 (RoPE frequencies and SAM's positional
    Gaussian lose the positions in bf16). The same precision policy as loading."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


# --- saving ------------------------------------------------------------------------------------
def _check_mergeable(model: SesameModel) -> None:
    if hasattr(model.llm, "peft_config") or any("lora_" in n for n, _ in model.named_parameters()):
        raise CheckpointError("the model still has unmerged LoRA adapters: call model.lora.merge_lora(model) "
                              "before save_released (the released layout holds merged weights only)")


def released_state_dict(model: SesameModel) -> dict[str, torch.Tensor]:
    """The model's tensors under released names (CLIP left out), plus the per-layer
    `rotary_emb.inv_freq` that transformers 4.31 expects to find."""
    state = {}
    for name, tensor in model.state_dict().items():
        key = internal_to_released(name)
        if key is not None:
            state[key] = tensor
    inv_freq = model.language_model.model.rotary_emb.inv_freq.float()
    for i in range(model.config.llm.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()  # safetensors: no sharing
    return state


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def released_config(model: SesameModel, architecture: str, dtype: torch.dtype) -> dict:
    """config.json in the released schema (LLaVA's flat LlamaConfig + mm_* + SESAME fields)."""
    import transformers

    c, llm = model.config, model.config.llm
    out = {
        "architectures": [architecture],
        "bos_token_id": llm.bos_token_id,
        "eos_token_id": llm.eos_token_id,
        "freeze_mm_mlp_adapter": True,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "initializer_range": INIT_STD,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "mm_hidden_size": c.vision.hidden_size,
        "mm_projector_type": c.mm_projector_type,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": c.use_mm_start_end,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": c.vision.select_layer,
        "mm_vision_tower": c.vision.name_or_path,
        "model_type": "llava",
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "out_dim": c.out_dim,
        "pad_token_id": llm.pad_token_id,
        "pretrain_mm_mlp_adapter": None,
        "pretraining_tp": 1,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": llm.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "train_mask_decoder": c.train_mask_decoder,
        "transformers_version": transformers.__version__,
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_tower": c.vision.name_or_path,
        "vocab_size": llm.vocab_size,
    }
    return dict(sorted(out.items()))


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def save_released(model: SesameModel, tokenizer, out_dir: str, *, safe_serialization: bool = False,
                  architecture: Optional[str] = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  dtype: Optional[torch.dtype] = None, vision_tower: Optional[str] = None) -> list[str]:
    """Write `model` + `tokenizer` in the released layout, loadable by the original code and by
    `model.builder.load_pretrained`. Returns the written paths.

    safe_serialization: safetensors (`model*.safetensors` + index) instead of the released
        `pytorch_model*.bin` (+ `pytorch_model.bin.index.json` when sharded).
    architecture: defaults to READForCausalLM for a model with SasP, else the model's own.
    dtype: the parameter dtype written (default: the model's; the releases are bfloat16).
    vision_tower: the CLIP name/path written to config.json (default: the model's).
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    from .tokenizer import save_slow_tokenizer

    _check_mergeable(model)
    if architecture is None:
        architecture = "READForCausalLM" if model.config.sasp is not None else model.config.architecture
    if architecture not in RELEASED_ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {architecture!r}; known: {', '.join(RELEASED_ARCHITECTURES)}")
    dtype = dtype or model.dtype
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"cannot save in {dtype}; use one of {list(_DTYPE_NAMES)}")
    if len(tokenizer) > model.config.llm.vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{model.config.llm.vocab_size} embedding rows")
    os.makedirs(out_dir, exist_ok=True)

    buffers = {internal_to_released(n) for n, _ in model.named_buffers()}
    state = released_state_dict(model)

    def stored_dtype(key: str, t: torch.Tensor) -> torch.dtype:
        # parameters in `dtype`; buffers (SAM's Gaussian, RoPE frequencies) keep float32
        if not t.is_floating_point() or key in buffers or key.endswith("rotary_emb.inv_freq"):
            return t.dtype
        return dtype

    sizes = {k: torch.empty(t.shape, dtype=stored_dtype(k, t), device="meta") for k, t in state.items()}
    pattern = "model{suffix}.safetensors" if safe_serialization else "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(sizes, filename_pattern=pattern, max_shard_size=max_shard_size)
    for name in (SAFE_FILE, SAFE_INDEX, BIN_FILE, BIN_INDEX):  # a stale index would shadow the new files
        stale = os.path.join(out_dir, name)
        if os.path.isfile(stale):
            os.remove(stale)
    written = []
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state[k].detach().to(device="cpu", dtype=stored_dtype(k, state[k])).contiguous() for k in keys}
        path = os.path.join(out_dir, filename)
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, path, metadata={"format": "pt"})
        else:
            torch.save(shard, path)
        written.append(path)
        del shard
    if split.is_sharded:
        index = os.path.join(out_dir, SAFE_INDEX if safe_serialization else BIN_INDEX)
        _write_json(index, {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))})
        written.append(index)

    config = released_config(model, architecture, dtype)
    if vision_tower is not None:
        config["vision_tower"] = config["mm_vision_tower"] = vision_tower
    _write_json(os.path.join(out_dir, CONFIG_FILE), config)
    llm = model.config.llm
    _write_json(os.path.join(out_dir, GENERATION_CONFIG_FILE),
                {"_from_model_config": True, "bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id,
                 "pad_token_id": llm.pad_token_id, "transformers_version": config["transformers_version"]})
    written += [os.path.join(out_dir, CONFIG_FILE), os.path.join(out_dir, GENERATION_CONFIG_FILE)]
    written += save_slow_tokenizer(tokenizer, out_dir)
    return written
