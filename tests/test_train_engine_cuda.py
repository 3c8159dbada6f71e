"""The training engine on a GPU: torch's fused AdamW (the default, nothing to compile) makes the same
updates as DeepSpeed's FusedAdam (the original's, --ds_fused_adam) under bf16 ZeRO-2."""
import os
import subprocess
import sys

import pytest
import torch
from cpu_deepspeed import child_env

from utils import distributed as dist_utils

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WORKER = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import torch
from utils import distributed as dist_utils
dist_utils.default_cuda_arch_list()
dist_utils.init_distributed()
import test_train_engine as T
from dataset.collate import collate_fn
from model.tiny import tiny_tokenizer
from training.deepspeed_config import DeepSpeedRecipe, optimizer_name
from training.engine import build_engine

tok, ids = tiny_tokenizer(os.path.join(sys.argv[1], "assets", "tiny_tokenizer"))
def flat(engine):
    return torch.cat([p.detach().float().flatten() for p in engine.optimizer.single_partition_of_fp32_groups])


start, end, kinds = [], [], []
for ds_optimizer in (False, True):
    model = T.trainable_model(tok, ids, dtype=torch.bfloat16).cuda()
    recipe = DeepSpeedRecipe(micro_batch_size=2, precision="bf16", zero_stage=2, lr=1e-2, total_steps=10,
                             warmup_steps=1, ds_optimizer=ds_optimizer)
    engine = build_engine(model, recipe)
    start.append(flat(engine).clone())
    data = T.IndexedSamples(model, 4)
    batch = T.to_engine(engine)(collate_fn([data[0], data[2]], tok))
    torch.manual_seed(1)  # the same LoRA dropout masks in both runs
    for _ in range(3):
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
    base = engine.optimizer.optimizer
    kinds.append((optimizer_name(recipe), type(base).__name__, bool(base.param_groups[0].get("fused"))))
    end.append(flat(engine))
print("kinds", kinds, flush=True)
assert kinds[0] == ("torch AdamW", "AdamW", True) and kinds[1][1] == "FusedAdam", kinds
assert torch.equal(start[0], start[1])
# GPU reductions are not bit-reproducible, and Adam's first steps move a weight by about lr whatever the
# size of its gradient, so a gradient near 0 may flip sign between runs: compare the updates in bulk.
update = (end[1] - start[1]).abs().mean().item()
gap = (end[0] - end[1]).abs()
print(f"mean update {update:.3e}, mean difference {gap.mean().item():.3e}, "
      f"elements off by > 1e-5: {(gap > 1e-5).float().mean().item():.2%}", flush=True)
assert update > 1e-3  # the runs trained
assert gap.mean().item() <= 1e-3 * update and (gap > 1e-5).float().mean().item() <= 0.01
print("same updates", flush=True)
'''


def test_torch_fused_adamw_updates_like_deepspeed_fused_adam(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = child_env()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                          "--master_port", str(dist_utils.free_port()), str(worker), root],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "same updates" in run.stdout
