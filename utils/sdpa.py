"""Which kernels torch's `scaled_dot_product_attention` may pick, for the whole process.

Every attention of the model (LLaMA and CLIP through transformers' "sdpa" implementation, SAM's image
encoder through model/sam.py) calls `F.scaled_dot_product_attention`, and torch picks a kernel per call
from the enabled backends. On Hopper GPUs recent torch releases prefer cuDNN's attention, which builds
an execution plan for every new input shape on the host; training batches change their sequence
lengths every step, so each step pays those builds again (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

AUTO = "auto"
# name -> (switch, state) of torch's per-backend setting
_BACKENDS = {
    "flash": (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.flash_sdp_enabled),
    "efficient": (torch.backends.cuda.enable_mem_efficient_sdp, torch.backends.cuda.mem_efficient_sdp_enabled),
    "cudnn": (torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.cudnn_sdp_enabled),
    "math": (torch.backends.cuda.enable_math_sdp, torch.backends.cuda.math_sdp_enabled),
}
SDPA_BACKENDS = tuple(_BACKENDS)


def parse_sdpa_backends(value: str, flag: str = "--sdpa_backends") -> tuple[str, ...]:
    """'auto' -> () (torch's own choice among all); 'flash,efficient,math' -> those names."""
    value = value.strip().lower()
    if value == AUTO:
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown or not names:
        raise ValueError(f"{flag} {value!r}: expected '{AUTO}' or a comma list of {', '.join(SDPA_BACKENDS)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return names


def set_sdpa_backends(names: tuple[str, ...]) -> None:
    """Enable exactly `names` (all four when empty: torch's default)."""
    for name, (switch, _) in _BACKENDS.items():
        switch(not names or name in names)


def enabled_sdpa_backends() -> tuple[str, ...]:
    return tuple(name for name, (_, enabled) in _BACKENDS.items() if enabled())
