"""engine/decode_attention.py on the CPU through Triton's interpreter (float16: the interpreter has no
bfloat16); tests/test_decode_attention_cuda.py runs it on the device, inside the engine too."""
import pytest
import torch
from triton_interpreter import run_in_interpreter

CHECK = """
import torch
from decode_attention_check import worst_error

# (rows, heads, kv_heads, n, d, columns, read): the evaluation's shape scaled down, grouped-query heads,
# one query row, a read that ends inside a block, fewer columns than one block, n not a power of two
for shape in [(3, 4, 4, 8, 32, 200, 150), (2, 4, 2, 3, 16, 80, 77), (1, 2, 1, 1, 64, 40, 33),
              (2, 2, 2, 5, 32, 130, 130)]:
    err = worst_error(*shape, torch.half, "cpu")
    assert err < 4e-3, (shape, err)
    print(shape, "relative error", err)
print("decode attention ok")
"""


# on a GPU host tests/test_decode_attention_cuda.py runs the kernel itself (and the Triton
# interpreter of the torch 2.11 GPU image cannot loop to a bound passed as an argument)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA twin covers the kernel")
def test_decode_attention_equals_sdpa_in_the_interpreter():
    done = run_in_interpreter(CHECK)
    assert done.returncode == 0 and "decode attention ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
