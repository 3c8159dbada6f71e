"""The DeepSpeed configuration SESAME trains with, as a typed recipe.

The original builds it inline: ZeRO-2 (contiguous gradients, overlapped communication, reduce
scatter, 5e8 buckets), AdamW (betas 0.9/0.95, weight decay 0), WarmupDecayLR (linear warm-up over
100 steps from 0 to `lr`, then linear decay to 0 at epochs x steps_per_epoch), gradient clipping 1.0
and bf16. ZeRO-3 and CPU offload (optimizer; parameters with ZeRO-3) are opt-in for small GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class DeepSpeedRecipe:
    micro_batch_size: int = 12
    grad_accumulation_steps: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    total_steps: int = 10_000
    warmup_steps: int = 100
    gradient_clipping: float = 1.0
    precision: str = "bf16"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only: parameters live in CPU memory between uses
    # The optimizer lives in the DS config (FusedAdam / DeepSpeedCPUAdam, JIT-built ops) or is a
    # client torch.optim.AdamW with the same hyper-parameters (no op build; fused on GPUs).
    ds_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("--offload_optimizer needs ZeRO stage 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("--offload_param needs --zero_stage 3")
        if self.offload_optimizer and not self.ds_optimizer:
            raise ValueError("CPU optimizer offload needs DeepSpeed's own optimizer (DeepSpeedCPUAdam)")
        for name in ("micro_batch_size", "grad_accumulation_steps", "total_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def build_deepspeed_config(r: DeepSpeedRecipe) -> dict:
    zero: dict = {
        "stage": r.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if r.zero_stage == 3:
        # allgather buckets are a stage-1/2 notion; stage 3 prefetches instead.
        zero.pop("allgather_bucket_size")
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if r.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if r.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict = {
        "train_micro_batch_size_per_gpu": r.micro_batch_size,
        "gradient_accumulation_steps": r.grad_accumulation_steps,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": r.total_steps,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": r.lr,
                "warmup_num_steps": r.warmup_steps,
                "warmup_type": "linear",
            },
        },
        "fp16": {"enabled": r.precision == "fp16"},
        "bf16": {"enabled": r.precision == "bf16"},
        "gradient_clipping": r.gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,  # our own logger reports; keep DeepSpeed's quiet
        "wall_clock_breakdown": False,
    }
    if r.ds_optimizer:
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": r.lr, "weight_decay": r.weight_decay, "betas": list(r.betas), "eps": r.eps},
        }
    else:
        # A client optimizer with ZeRO must be allowed explicitly, and DS must not swap it.
        cfg["zero_allow_untested_optimizer"] = True
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def client_optimizer(params, r: DeepSpeedRecipe):
    """torch AdamW with exactly the DS-config hyper-parameters (no JIT-built op): the same update as
    DeepSpeed's FusedAdam in AdamW mode, fused into a few kernels when every parameter is on a GPU."""
    import torch

    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=r.lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay,
                             fused=fused or None)


# Each optimizer implementation, and the flags that select it (what a refused resume advises).
OPTIMIZER_FLAGS = {"torch AdamW": "without --ds_fused_adam and --offload_optimizer",
                   "DeepSpeed FusedAdam": "with --ds_fused_adam",
                   "DeepSpeedCPUAdam": "with --offload_optimizer"}


def optimizer_name(r: DeepSpeedRecipe) -> str:
    """Which optimizer implementation holds the state a checkpoint saves (they lay it out differently):
    a run resumes only with the one that wrote it (training/checkpoints.py). A key of OPTIMIZER_FLAGS."""
    if not r.ds_optimizer:
        return "torch AdamW"
    return "DeepSpeedCPUAdam" if r.offload_optimizer else "DeepSpeed FusedAdam"
