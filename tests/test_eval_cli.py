"""test_sesame.py as a command: --launch over 2 shards, and a run killed with SIGKILL then resumed,
on the tiny random checkpoint and the synthetic data root."""
import json
import os
import signal
import subprocess
import sys
import time

from child_env import child_pythonpath

from dataset.eval_sets import build_eval_dataset
from dataset.synthetic import generate
from evaluation.records import merge_shards, read_shard, shard_dir, shard_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(data, out, *extra):
    return [sys.executable, os.path.join(ROOT, "test_sesame.py"), "--pretrained_model_path", "tiny-random",
            "--val_dataset", "fprefcoco", "--dataset_dir", str(data), "--vis_save_path", str(out), "--device", "cpu",
            "--precision", "fp32", "--max_new_tokens", "24", "--num_workers", "0", "--no_progress", *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = child_pythonpath(with_repo=True)
    return env


def test_launch_then_kill_and_resume(tmp_path):
    data = tmp_path / "data"
    generate(str(data), seed=0)
    expected = {(im.image_id, q.ref_id, q.sent_id) for im in build_eval_dataset("fprefcoco", str(data), "val")
                for q in im.queries}
    assert len(expected) >= 10

    # one command: 2 shards as 2 processes, then metrics
    out = subprocess.run(_cmd(data, tmp_path / "launch", "--world_size", "2", "--launch"), env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    merged = merge_shards(shard_dir(str(tmp_path / "launch"), "fprefcoco", "val"))
    assert merged.world_size == 2 and not merged.incomplete
    assert sorted(r.key for r in merged.records) == sorted(expected)  # every query exactly once
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["metrics"]["overall"]["counts"]["queries"] == len(expected)
    reference = {r.key: r for r in merged.records}

    # killed with SIGKILL after its first records, then the same command again
    path = shard_path(str(tmp_path / "killed"), "fprefcoco", "val", 0, 1)
    cmd = _cmd(data, tmp_path / "killed", "--queries_per_batch", "1")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(read_shard(path)) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_shard(path)
    assert 2 <= len(partial) < len(expected)
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["queries_skipped"] == len(partial) and summary["queries_run"] == len(expected) - len(partial)
    resumed = read_shard(path)
    assert len(resumed) == len(expected)
    assert {r.key: r for r in resumed} == reference


def test_unreadable_image_one_line_or_skipped_and_counted(tmp_path):
    """An evaluation image that is not an image: one `error:` line naming it (no traceback), or with
    --on_error skip a finished run whose metrics.json counts what was left out and says incomplete."""
    data = tmp_path / "data"
    generate(str(data), seed=0)
    images = build_eval_dataset("fprefcoco", str(data), "val")
    with open(images[0].image_path, "wb") as f:
        f.write(b"this is not a jpeg")
    stop = subprocess.run(_cmd(data, tmp_path / "stop"), env=_env(), capture_output=True, text=True, timeout=600)
    assert stop.returncode == 1 and "Traceback" not in stop.stderr
    last = stop.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and os.path.basename(images[0].image_path) in last and "not an image" in last
    skip = subprocess.run(_cmd(data, tmp_path / "skip", "--on_error", "skip", "--world_size", "1", "--launch"),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert skip.returncode == 0, skip.stderr[-3000:]
    with open(os.path.join(shard_dir(str(tmp_path / "skip"), "fprefcoco", "val"), "metrics.json")) as f:
        metrics = json.load(f)
    lost = len(images[0].queries)
    assert not metrics["complete"] and metrics["set"]["skipped"]["queries"] == lost
    assert metrics["set"]["skipped"]["reasons"] == {"image/not_an_image": 1}
    assert metrics["metrics"]["overall"]["counts"]["queries"] == sum(len(im.queries) for im in images) - lost
