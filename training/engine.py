"""Wrapping a SESAME model in a DeepSpeed engine."""
from __future__ import annotations

import torch

from .deepspeed_config import DeepSpeedRecipe, build_deepspeed_config, client_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_engine(model: torch.nn.Module, recipe: DeepSpeedRecipe):
    """deepspeed.initialize over the trainable parameters; returns the engine."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (call model.lora.set_trainable first)")
    optimizer = None if recipe.ds_optimizer else client_optimizer(params, recipe)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           config=build_deepspeed_config(recipe))
    return engine


def uses_ds_optimizer(device: torch.device, offload_optimizer: bool, ds_fused_adam: bool = False) -> bool:
    """DeepSpeed's own optimizer only where it is needed or asked for: DeepSpeedCPUAdam when the
    optimizer is offloaded, FusedAdam with --ds_fused_adam (the original's; JIT-built on first use,
    which needs nvcc and ninja). Otherwise a client torch AdamW with the same
    hyper-parameters, fused on GPUs: nothing to compile."""
    if ds_fused_adam and device.type == "cpu":
        raise ValueError("--ds_fused_adam needs a GPU (DeepSpeed's FusedAdam is a CUDA op)")
    return offload_optimizer or ds_fused_adam
