"""Which kernels torch's `scaled_dot_product_attention` may pick, for the whole process.

Every attention of the model (LLaMA and CLIP through transformers' "sdpa" implementation, SAM's image
encoder through model/sam.py) calls `F.scaled_dot_product_attention`, and torch picks a kernel per call
from the enabled backends. On Hopper GPUs recent torch releases prefer cuDNN's attention, which builds
an execution plan for every new input shape on the host; training batches change their sequence
lengths every step, so each step pays those builds again (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
AUTO = "auto"
_SWITCHES = {
    "flash": torch.backends.cuda.enable_flash_sdp,
    "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
    "cudnn": torch.backends.cuda.enable_cudnn_sdp,
    "math": torch.backends.cuda.enable_math_sdp,
}


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
    for name, switch in _SWITCHES.items():
        switch(not names or name in names)


def enabled_sdpa_backends() -> tuple[str, ...]:
    cuda = torch.backends.cuda
    checks = {"flash": cuda.flash_sdp_enabled, "efficient": cuda.mem_efficient_sdp_enabled,
              "cudnn": cuda.cudnn_sdp_enabled, "math": cuda.math_sdp_enabled}
    return tuple(n for n in SDPA_BACKENDS if checks[n]())
