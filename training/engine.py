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


def uses_ds_optimizer(device: torch.device, offload_optimizer: bool) -> bool:
    """DeepSpeed's fused AdamW on GPUs (and DeepSpeedCPUAdam when offloading); on a CPU-only machine
    a client torch AdamW with the same hyper-parameters avoids JIT-building the fused op."""
    return device.type != "cpu" or offload_optimizer
