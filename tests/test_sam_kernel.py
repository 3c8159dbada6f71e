"""The Triton kernels of model/sam_rel_pos_kernel.py on the CPU, through Triton's interpreter (no GPU
in CI): they write what SdpaSamAttention's PyTorch calls write. float16 here (the interpreter has no
bfloat16); the GPU file tests/test_sam_kernel_cuda.py covers both on the device."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import torch
from segment_anything.modeling.image_encoder import Attention as SamAttention
from model import sam_rel_pos_kernel
from model.sam import SdpaSamAttention

for batch, h, w, heads, d in [(2, 14, 14, 2, 80), (3, 4, 4, 2, 8), (2, 12, 20, 2, 24), (2, 7, 5, 3, 40)]:
    torch.manual_seed(0)
    attn = SamAttention(heads * d, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(h, w))
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    attn = SdpaSamAttention(attn).half()
    qkv = torch.randn(batch, h * w, 3, heads, d, dtype=torch.half)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with torch.no_grad():
        table_h = attn._rel_table(h, attn.rel_pos_h, torch.half) / attn.scale
        table_w = attn._rel_table(w, attn.rel_pos_w, torch.half) / attn.scale
        width = -(-(d + h + w) // 8) * 8
        want_q, want_k = attn._extend(q, k, table_h, table_w, (h, w), width)
        got_q, got_k = sam_rel_pos_kernel.extend_qk(qkv, table_h, table_w, (h, w), width)
    where = (batch, h, w, heads, d)
    assert got_q.shape == want_q.shape, where
    assert torch.equal(got_k, want_k), where
    assert torch.equal(got_q[..., :d], want_q[..., :d]), where
    assert torch.equal(got_q[..., d + h + w:], want_q[..., d + h + w:]), where
    err = (got_q[..., d:d + h + w].float() - want_q[..., d:d + h + w].float()).abs().max()
    assert err <= 0.01 * want_q[..., d:d + h + w].float().abs().max(), (where, float(err))
print("kernels ok")
"""


def test_kernels_write_what_the_pytorch_calls_write_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-3000:]
