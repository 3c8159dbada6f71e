"""The Triton kernels of engine/fused_kernels.py on the CPU, through Triton's interpreter (no GPU in
CI): they give what the PyTorch calls give, to one unit in the last place. float16 here (the
interpreter has no bfloat16); tests/test_fused_kernels_cuda.py covers both on the device."""
from triton_interpreter import run_in_interpreter

CHECK = """
import torch
from fused_kernels_check import check_rms, check_silu_mul

for shape, pad in [((5, 4096), 0), ((2, 3, 80), 16), ((4, 1000), 0), ((1, 1, 1000), 24)]:
    worst, equal = check_rms(shape, torch.half, "cpu", row_pad=pad)
    # one ulp where the sums' order tips a rounding, rarely; rounding once instead of twice (before
    # and after the weight product) would give a quarter of the elements one ulp off
    assert worst <= 1 and equal >= 0.99, ("rms", shape, worst, equal)
    print("rms", shape, "max ulp", worst, "equal", equal)
for shape, packed in [((3, 11008), True), ((2, 2, 80), True), ((3, 1000), False), ((2, 1, 4096), True)]:
    silu, product = check_silu_mul(shape, torch.half, "cpu", packed=packed)
    assert silu <= 1, ("silu_mul", shape, silu)  # numpy's exp here, not PyTorch's
    print("silu_mul", shape, "max ulp: silu", silu, "product", product)
print("kernels ok")
"""


def test_kernels_give_what_the_pytorch_calls_give_in_the_interpreter():
    done = run_in_interpreter(CHECK)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
