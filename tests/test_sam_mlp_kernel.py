"""model/sam_mlp_kernel.py's linear_gelu on the CPU, through Triton's interpreter (no GPU in CI): it
rounds where F.gelu(F.linear(x, w, b)) rounds, and is as close to the float64 result. float16 here (the
interpreter has no bfloat16); tests/test_sam_mlp_kernel_cuda.py covers both on the device. One small
config is pinned (SAM_MLP_CONFIG): several tiles on each axis, K not a multiple of BLOCK_K, a partial
last group of row tiles, and no autotuning, slow in the interpreter."""
from triton_interpreter import run_in_interpreter

CHECK = """
import os
os.environ["SAM_MLP_CONFIG"] = "BLOCK_M=16,BLOCK_N=32,BLOCK_K=16,GROUP_M=2,num_warps=4,num_stages=1"
import torch
from sam_mlp_check import check_accuracy, check_rounding

# (x shape, N): M, N, K not multiples of the blocks; leading dims; one tile; K < BLOCK_K
for shape, n in [((37, 48), 80), ((2, 5, 40), 72), ((16, 32), 32), ((3, 7, 8), 100), ((1, 200), 24)]:
    worst, equal = check_rounding(shape, n, torch.half, "cpu")
    # numpy's erf here, not PyTorch's: one ulp where that tips a rounding, rarely
    assert worst <= 1 and equal >= 0.99, ("rounding", shape, n, worst, equal)
    eager_diff, kernel_err, eager_err = check_accuracy(shape, n, torch.half, "cpu")
    assert kernel_err <= 2 * eager_err + 1e-6, ("accuracy", shape, n, kernel_err, eager_err)
    print(shape, n, "max ulp", worst, "equal", equal, "| vs eager", eager_diff,
          "| err vs float64: kernel", kernel_err, "eager", eager_err)

# WindowedBlock's MLP takes the kernel where it applies (forced on here: the interpreter runs on the
# CPU), and not for another activation
from unittest import mock
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Block
from model import sam_mlp_kernel
from model.sam import WindowedBlock
torch.manual_seed(0)
block = WindowedBlock(Block(32, 2, window_size=4)).half()
x = torch.randn(2, 6, 6, 32, dtype=torch.half)
with torch.inference_mode(), mock.patch.object(sam_mlp_kernel, "available", lambda *_: True):
    calls = []
    real = sam_mlp_kernel.linear_gelu
    with mock.patch.object(sam_mlp_kernel, "linear_gelu", lambda *a: calls.append(1) or real(*a)):
        fused, plain = block._mlp(x), block.mlp(x)
        assert calls and (fused - plain).abs().max() <= 0.01 * plain.abs().max(), (fused - plain).abs().max()
        block.mlp = MLPBlock(32, 128, act=torch.nn.ReLU).half()
        calls.clear()
        assert torch.equal(block._mlp(x), block.mlp(x)) and not calls
print("kernel ok")
"""


def test_linear_gelu_rounds_as_eager_in_the_interpreter():
    done = run_in_interpreter(CHECK)
    assert done.returncode == 0 and "kernel ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
