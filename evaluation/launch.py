"""One process per GPU for the shards of an evaluation (`test_sesame.py --launch`)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence


def visible_gpus(gpus: Optional[str]) -> list[str]:
    """GPU ids to use: `gpus` ("0,1"), else the caller's CUDA_VISIBLE_DEVICES, else every device."""
    if gpus is not None:
        return [g.strip() for g in gpus.split(",") if g.strip()]
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def launch_shards(script: str, argv: Sequence[str], world_size: int, gpus: list[str]) -> int:
    """Run `script argv --cmd inference --process_num k --world_size w` for every shard k, shard k on
    GPU gpus[k % len(gpus)] (none: on the CPU); wait for all. Returns 0 when every shard finished."""
    child_argv = [a for a in argv if a != "--launch"]
    procs = []
    for k in range(world_size):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        cmd = [sys.executable, script, *child_argv, "--cmd", "inference", "--process_num", str(k),
               "--world_size", str(world_size)]
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [k for k, p in enumerate(procs) if p.wait() != 0]
    if failed:
        print(f"shards {failed} failed; rerun the same command to resume them", file=sys.stderr)
        return 1
    return 0
