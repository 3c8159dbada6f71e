"""Evaluation scaling over GPUs: the same work on 1 and on N GPUs, one process per GPU, as
`test_sesame.py --launch` runs it (contiguous image shards, one JSONL file each, then the metrics step).

Each worker builds the full-size architecture (LLaMA-7B, CLIP ViT-L/14-336, SAM ViT-H) with the same
seeded random bf16 weights, answers its shard of synthetic FP-RefCOCO-like work (benchmarks/
eval_throughput.py's images and question wording, 24-token answers, [SEG] in half) with the real runner
(evaluation/runner.py), and writes its records; the parent merges them and computes the metrics
(evaluation/report.py). Reported per GPU count: wall time from the processes' start to the metrics
(model building, loading and metrics included), queries/s, speed-up and efficiency against 1 GPU, and
whether the merged records equal the 1-GPU run's (same answers, same masks) and the metrics match.

    python benchmarks/eval_scaling.py --gpus 1,2 --images 128   # a machine with 2 GPUs
    python benchmarks/eval_scaling.py --tiny --gpus 1,2         # CPU: 2 processes, tiny random model
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def image_sizes(tiny: bool) -> list[tuple[int, int]]:
    return [(48, 64), (64, 40)] if tiny else [(480, 640), (640, 427), (427, 640), (500, 375)]


def content_hook(seg_id: int, eos_id: int, seg_step: int = 3):
    """EOS never (fixed answer lengths); [SEG] at `seg_step` for about half of the queries, chosen by
    what the query's own logits say, never by its row: the same queries get one under any sharding."""
    def hook(step, logits, rows):  # noqa: ARG001 - the engine's hook signature
        logits = logits.clone()
        logits[:, eos_id] = float("-inf")
        if step == seg_step:
            pick = (logits[:, :64].sum(-1) * 8).floor().long() % 2 == 0
            logits[pick, seg_id] += 1e4
        return logits
    return hook


def worker(args) -> None:
    entered = time.time()
    import torch
    from eval_throughput import build_full_model, build_tiny_model, synthetic_images

    import test_sesame
    from engine import build_predictor
    from evaluation.runner import run_shard

    imported = time.time()
    torch.manual_seed(0)  # the same random weights in every process
    loaded = build_tiny_model() if args.tiny else build_full_model("cuda")
    if not args.tiny:
        torch.cuda.synchronize()
    built = time.time()
    images = synthetic_images(args.image_dir, args.images, args.queries_per_image, image_sizes(args.tiny), write=False)
    eval_args = test_sesame.build_parser().parse_args(
        ["--vis_save_path", args.out, "--max_new_tokens", str(args.max_new_tokens), "--num_workers",
         str(0 if args.tiny else 8), "--no_progress", "--process_num", str(args.process_num),
         "--world_size", str(args.world_size)])
    cfg = loaded.model.config
    predictor = build_predictor(loaded, conv_type=eval_args.conv_type, max_new_tokens=eval_args.max_new_tokens,
                                max_text_tokens=eval_args.model_max_length,
                                config=test_sesame.engine_config(eval_args),
                                logits_hook=content_hook(cfg.seg_token_id, cfg.llm.eos_token_id))
    print(f"worker {args.process_num}: Python start {entered - args.launched_at:.1f} s, imports "
          f"{imported - entered:.1f} s, model built {built - imported:.1f} s, set-up before the loop "
          f"{time.time() - built:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(run_shard(test_sesame.eval_run(eval_args), predictor, images,
                               test_sesame.image_reader(eval_args, None))), flush=True)


def run_world(args, world: int, gpus: list[str], out: str) -> tuple[float, float]:
    """Seconds from starting `world` worker processes to the end of the metrics step, and the slowest
    worker's seconds inside the evaluation loop (start-up, model building and metrics left out)."""
    from evaluation.report import write_metrics

    start = time.perf_counter()
    procs = []
    for k in range(world):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k]
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--process_num", str(k), "--world_size",
               str(world), "--out", out, "--image_dir", args.image_dir, "--images", str(args.images),
               "--queries_per_image", str(args.queries_per_image), "--max_new_tokens", str(args.max_new_tokens),
               "--launched_at", repr(time.time())]
        procs.append(subprocess.Popen(cmd + (["--tiny"] if args.tiny else []), env=env, stdout=subprocess.PIPE,
                                      text=True))
    shard_seconds = []
    for p in procs:  # each worker prints its shard summary (JSON) last
        output = p.communicate()[0]
        print(output, end="", flush=True)
        if p.returncode != 0:
            raise SystemExit(f"a worker of the {world}-process run failed")
        shard_seconds.append(json.loads(output.strip().splitlines()[-1])["seconds"])
    workers_done = time.perf_counter()
    write_metrics(out, "fprefcoco", "val", world_size=world)
    end = time.perf_counter()
    print(f"{world} process(es): workers {workers_done - start:.1f} s (slowest loop {max(shard_seconds):.1f} s), "
          f"metrics step {end - workers_done:.1f} s", flush=True)
    return end - start, max(shard_seconds)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default="1,2", help="GPU counts to compare, the first is the baseline")
    ap.add_argument("--gpu_ids", default=None,
                    help="comma-separated CUDA device ids, in order (default 0, 1, ...); N GPUs takes the first N")
    ap.add_argument("--tiny", action="store_true", help="CPU processes and the tiny random model")
    ap.add_argument("--images", type=int, default=None, help="default 128 (tiny: 8)")
    ap.add_argument("--queries_per_image", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=24)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--process_num", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world_size", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--launched_at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--image_dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.images = args.images or (8 if args.tiny else 128)
    if args.worker:
        worker(args)
        return {}
    from evaluation.records import merge_shards, shard_dir

    counts = [int(c) for c in args.gpus.split(",")]
    figures = {"images": args.images, "queries": args.images * args.queries_per_image, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        from eval_throughput import synthetic_images

        args.image_dir = os.path.join(tmp, "images")
        os.makedirs(args.image_dir)
        synthetic_images(args.image_dir, args.images, args.queries_per_image, image_sizes(args.tiny))
        records = {}
        ids = args.gpu_ids.split(",") if args.gpu_ids else [str(i) for i in range(max(counts))]
        if not args.tiny and len(ids) < max(counts):
            raise SystemExit(f"--gpu_ids {args.gpu_ids} names {len(ids)} GPU(s); the largest run needs {max(counts)}")
        for world in counts:
            out = os.path.join(tmp, f"gpus_{world}")
            gpus = [] if args.tiny else ids[:world]
            seconds, loop_seconds = run_world(args, world, gpus, out)
            merged = merge_shards(shard_dir(out, "fprefcoco", "val"), world)
            records[world] = {r.key: r for r in merged.records}
            with open(os.path.join(shard_dir(out, "fprefcoco", "val"), "metrics.json")) as f:
                metrics = json.load(f)["metrics"]
            figures["runs"][world] = {"seconds": seconds, "queries_per_s": len(merged.records) / seconds,
                                      "loop_seconds": loop_seconds, "metrics": metrics["overall"]}
        base = counts[0]
        for world in counts:
            run = figures["runs"][world]
            run["speedup"] = figures["runs"][base]["seconds"] / run["seconds"]
            run["loop_speedup"] = figures["runs"][base]["loop_seconds"] / run["loop_seconds"]
            run["efficiency"] = run["speedup"] / (world / base)
            run["records_equal_to_base"] = records[world] == records[base]
            same = [key in records[base] and records[base][key] == r for key, r in records[world].items()]
            run["identical_records"] = sum(same) / max(1, len(same))
            run["metrics_equal_to_base"] = run["metrics"] == figures["runs"][base]["metrics"]
    print("\n| processes | seconds (start to metrics) | queries/s | speed-up | efficiency | loop seconds (slowest "
          "worker) | loop speed-up | records = base | metrics = base |")
    print("|---|---|---|---|---|---|---|---|---|")  # records: all equal, else the share of identical ones
    for world, run in figures["runs"].items():
        same = run["records_equal_to_base"] or round(run["identical_records"], 4)
        print(f"| {world} | {run['seconds']:.1f} | {run['queries_per_s']:.1f} | {run['speedup']:.2f}x | "
              f"{100 * run['efficiency']:.0f} % | {run['loop_seconds']:.1f} | {run['loop_speedup']:.2f}x | {same} | "
              f"{run['metrics_equal_to_base']} |")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
