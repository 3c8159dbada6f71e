"""The predictor with the batched engine as its backend, and the flags that load one."""
from __future__ import annotations

import argparse
from typing import Optional

from model.predictor import RowLogitsHook, SesamePredictor
from utils.errors import InputError

from .batched import BatchedInference
from .config import EngineConfig
from .llama_layers import pack_gate_up, pack_qkv, pad_lm_head
from .timing import StageTimer


def build_predictor(loaded, *, conv_type: str = "vicuna_v1", max_new_tokens: int = 512,
                    max_text_tokens: Optional[int] = None, config: Optional[EngineConfig] = None,
                    pack: bool = True, logits_hook: Optional[RowLogitsHook] = None,
                    timer: Optional[StageTimer] = None) -> SesamePredictor:
    """A `SesamePredictor` over `loaded` (model.builder.LoadedSesame) that answers with the batched
    engine: the same answers as the reference backend, faster.

    pack: pack the LLM's q/k/v projections, and its gate/up projections, into one weight per layer
        and group now, and pad lm_head's vocabulary to a multiple of 64 rows (`llama_layers.pack_qkv`,
        `pack_gate_up`, `pad_lm_head`; the modules keep their values, their parameters become
        views). Leave it off while something else, e.g. an optimizer, holds those parameters.
    """
    if pack:
        pack_qkv(loaded.model.language_model.model)
        pack_gate_up(loaded.model.language_model.model)
        pad_lm_head(loaded.model.language_model)
    engine = BatchedInference(loaded.model, config or EngineConfig(), logits_hook=logits_hook, timer=timer)
    return SesamePredictor(loaded, conv_type=conv_type, max_new_tokens=max_new_tokens,
                           max_text_tokens=max_text_tokens, backend=engine)


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every inference script shares: checkpoint, CLIP override, precision, device, prompt,
    answer length, and READ's SasP knobs."""
    from model.builder import TINY_RANDOM
    from model.config import PRECISIONS
    from model.conversation import SYSTEM_PROMPTS
    from model.sasp import add_sasp_arguments

    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_path", default="tsunghanwu/SESAME",
                   help=f"hub id or local directory of a SESAME / READ / LISA checkpoint; '{TINY_RANDOM}' is a tiny "
                        "untrained model for trying the pipeline")
    g.add_argument("--vision_tower", default=None, help="CLIP tower (hub id or directory) instead of the config's")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="default: bf16 on a GPU (as the original), fp32 on the CPU (where bf16 matmuls are several "
                        "times slower and round differently from a GPU's)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--conv_type", choices=sorted(SYSTEM_PROMPTS), default="vicuna_v1",
                   help="system prompt: vicuna_v1 is what the original evaluation and demo used, llava_v1 what "
                        "training used")
    g.add_argument("--max_new_tokens", type=int, default=512, help="longest answer, in tokens")
    bits = g.add_mutually_exclusive_group()
    bits.add_argument("--load_in_8bit", action="store_true",
                      help="LLM weights in 8 bits (per-channel int8; about 9.5 GiB of GPU memory for a 7B model)")
    bits.add_argument("--load_in_4bit", action="store_true",
                      help="LLM weights in 4 bits (groups of 128; about 6 GiB for a 7B model); CLIP and SAM stay in "
                           "--precision")
    add_sasp_arguments(parser)  # --use_sasp --num_points --t_pos --t_neg --down_sample (READ)


def resolve_device_and_precision(args: argparse.Namespace) -> str:
    """Fill in --device (cuda if available, else cpu) and --precision (bf16 on a GPU, fp32 on the CPU),
    checking the device; returns the device."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    args.device = device
    args.precision = args.precision or ("fp32" if torch.device(device).type == "cpu" else "bf16")
    return device


def load_predictor(args: argparse.Namespace, *, config: Optional[EngineConfig] = None,
                   max_text_tokens: Optional[int] = None, **options) -> SesamePredictor:
    """Load the checkpoint `add_predictor_arguments`' flags name and return its engine predictor.
    READ checkpoints bring SasP, --use_sasp adds it, the knob flags tune it (SasP has no weights, so
    setting it after loading is exact). options: more arguments of `build_predictor`."""
    import torch

    from model.builder import load_pretrained
    from model.config import PRECISIONS
    from model.quantize import check_quantization, quantize_llm
    from model.sasp import sasp_config_from_args

    device = resolve_device_and_precision(args)
    if args.max_new_tokens < 1:
        raise InputError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    bits = 8 if getattr(args, "load_in_8bit", False) else 4 if getattr(args, "load_in_4bit", False) else None
    dtype = PRECISIONS[args.precision]
    check_quantization(bits, torch.device(device), dtype)
    # quantised: read the checkpoint into host memory and bring the LLM over one quantised layer at a time,
    # so the GPU never holds the full-precision weights
    loaded = load_pretrained(args.pretrained_model_path, vision_tower=args.vision_tower, dtype=dtype,
                             device="cpu" if bits else device)
    if bits:
        quantize_llm(loaded.model.language_model, bits, torch.device(device))
        loaded.model.to(device)
    try:
        loaded.model.config.sasp = sasp_config_from_args(args, loaded.model.config.sasp)
    except ValueError as e:  # SasP knobs out of range, or given for a model without SasP
        raise InputError(str(e)) from None
    return build_predictor(loaded, conv_type=args.conv_type, max_new_tokens=args.max_new_tokens,
                           max_text_tokens=max_text_tokens, config=config, **options)
