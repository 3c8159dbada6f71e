"""eval_sesame.sh on a machine without GPUs: one CPU process per dataset, then the metrics."""
import json
import os
import subprocess
import sys

from child_env import child_pythonpath

from dataset.synthetic import generate
from evaluation.records import shard_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_sesame_sh_runs_on_the_cpu_when_no_gpu_is_visible(tmp_path):
    generate(str(tmp_path / "data"), seed=0)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, DATASETS="fprefcoco",
               EXTRA_ARGS="--precision fp32 --max_new_tokens 8 --num_workers 0 --no_progress",
               PYTHONPATH=child_pythonpath(with_repo=True), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("GPUS", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "eval_sesame.sh"), "tiny-random", str(tmp_path / "data"),
                          str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "no GPU visible: evaluating on the CPU" in run.stderr
    assert "=== fprefcoco (val) on the CPU ===" in run.stdout
    result = json.loads(open(os.path.join(shard_dir(str(tmp_path / "out"), "fprefcoco", "val"), "metrics.json")).read())
    assert result["world_size"] == 1 and result["complete"]
