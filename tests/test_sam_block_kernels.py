"""The Triton kernels of model/sam_block_kernels.py on the CPU, through Triton's interpreter (no GPU in
CI): they write what WindowedBlock's PyTorch calls write, and a small image encoder gives the same
outputs with them. float16 here (the interpreter has no bfloat16); the GPU file
tests/test_sam_block_kernels_cuda.py covers both on the device."""
from triton_interpreter import run_in_interpreter

CHECK = """
import torch
from sam_block_check import check_add_and_norm, check_norm_to_windows, with_and_without_kernels
from model.config import SAM_PRESETS
from model.sam import build_sam

# (batch, h, w, channels, window): padded windows on both axes, a window wider than the grid, whole
# windows only, channels not a power of two or not a multiple of 8
for geometry in [(2, 9, 7, 32, 4), (1, 14, 14, 48, 7), (1, 5, 6, 80, 8), (2, 8, 8, 64, 4), (2, 10, 9, 6, 7)]:
    for name, check, window in [("norm_to_windows", check_norm_to_windows, geometry[-1]),
                                ("add_windows_and_norm", check_add_and_norm, geometry[-1]),
                                ("add_and_norm", check_add_and_norm, 0)]:
        worst, equal = check(*geometry[:4], window, torch.half, "cpu")
        # one ulp where the LayerNorm's sums' order tips a rounding, rarely
        assert worst <= 1 and equal >= 0.99, (name, geometry, worst, equal)
        print(name, geometry, "max ulp", round(worst, 2), "equal", equal)

torch.manual_seed(0)
encoder = build_sam(SAM_PRESETS["tiny"]).image_encoder  # one windowed and one global block
for p in encoder.parameters():
    torch.nn.init.normal_(p, std=0.1)
fused, plain = with_and_without_kernels(encoder.half(), torch.randn(2, 3, 128, 128).half())
err = float((fused.float() - plain.float()).norm() / plain.float().norm())
assert fused.shape == plain.shape and err < 1e-3, err
print("encoder relative error", err)
print("kernels ok")
"""


def test_kernels_write_what_the_pytorch_calls_write_in_the_interpreter():
    done = run_in_interpreter(CHECK)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
