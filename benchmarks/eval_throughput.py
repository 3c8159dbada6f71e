"""Evaluation throughput: the batched prefix-sharing engine vs the original's strategy, same model.

Builds the full-size architecture (LLaMA-7B, CLIP ViT-L/14-336, SAM ViT-H) with random bf16 weights on
the GPU and runs the real evaluation loop of test_sesame.py (image files decoded and preprocessed by
loader threads, batched engine, records written as JSONL with RLE masks; evaluation/runner.py) over synthetic
FP-RefCOCO-like work: N images x Q queries, prompts in the vicuna_v1 template (the evaluation's) with
SESAME's question wording, answers capped at --max_new_tokens, [SEG] forced in half of the answers (so
mask decoding is counted) and EOS suppressed (every answer has the full length, in both strategies).
A warm-up run over the first batch comes first (reported as "cold"); the engine figure is the next
run over all images with the same predictor (what a long evaluation sees after its first batch;
--fresh_predictor builds one per run, as before session 16), and a third, synchronised run splits
the time by stage.

Then it times the original's strategy on a subset (`eval_sesame.py` + `evaluate()`): chunks of 5
queries of one image, left padded; SAM ViT-H run once per query (the image is repeated); every
decode step recomputes the whole sequence without a KV cache, with CLIP and the projector re-run
inside each step; masks of the chunk's [SEG]s. Its queries/s is extrapolated from the subset.

    python benchmarks/eval_throughput.py                  # GPU, full size
    python benchmarks/eval_throughput.py --skip_original --profile_dir DIR   # + per-stage kernel profile
    python benchmarks/eval_throughput.py --cuda_graphs | --compile_sam | --no_overlap_sam   # engine options
    python benchmarks/eval_throughput.py --tiny           # CPU smoke check, tiny random model
    python benchmarks/eval_throughput.py --skip_original --repeats 3 --compare no_overlap_sam
                                                          # + 3 rounds of A/B, alternated in one process

Prints a Markdown table to paste into benchmarks/RESULTS.md and one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
import zlib
from types import SimpleNamespace
from typing import Optional

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test_sesame  # noqa: E402
from dataset.eval_sets import EvalImage, EvalQuery, read_eval_image  # noqa: E402
from engine import StageTimer, build_predictor  # noqa: E402
from engine.memory import MAX_QUERIES  # noqa: E402
from evaluation.runner import run_shard  # noqa: E402
from model.builder import LoadedSesame  # noqa: E402
from model.config import SesameConfig  # noqa: E402
from model.conversation import build_prompt, tokenize_with_image  # noqa: E402
from model.sesame import SesameModel  # noqa: E402
from model.transforms import ClipTransform, SamTransform  # noqa: E402

# SESAME's first short question template (sesame.md §5) and RefCOCO-like expressions of varied length.
QUESTION = ("Can you confirm if {e} is present in this image? If it is, kindly provide the segmentation map. "
            "If it isn't, please state so and, if appropriate, mention any objects that might be mistaken for {e}.")
EXPRESSIONS = ["man in red", "left zebra", "white car behind the bus", "person on right", "the small dog",
               "woman holding an umbrella near the door", "bowl", "second giraffe from the left",
               "blue chair", "guy in the black shirt sitting down"]
STAGES = ("encoders", "prefill_prefix", "prefill_suffix", "decode", "masks")
RUN_RANGE = "whole_run"  # the profiled run's host range in the timeline trace
COMPARABLE = ("no_overlap_sam", "cuda_graphs", "compile_sam")  # engine flags --compare can toggle


class SyntheticTokenizer:
    """LLaMA-sized stand-in (vocab 32003, bos 1, eos 2, [SEG] 32000, <im_start> 32001, <im_end> 32002):
    words and punctuation hash to ids, words longer than 6 letters take two pieces, which gives
    about the lengths LLaMA's tokenizer gives for English."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    specials = {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}
    _pieces = re.compile(r"<im_start>|<im_end>|\[SEG\]|\w+|[^\w\s]")

    def __call__(self, text: str):
        ids = [self.bos_token_id]
        for piece in self._pieces.findall(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
                continue
            parts = [piece] if len(piece) <= 6 else [piece[:len(piece) // 2], piece[len(piece) // 2:]]
            ids.extend(3 + zlib.crc32(p.encode()) % 31997 for p in parts)
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids, skip_special_tokens=True) -> str:  # noqa: ARG002 - the tokenizer API's signature
        return " ".join(str(i) for i in ids)


def build_full_model(device: str) -> LoadedSesame:
    cfg = SesameConfig.preset("llama-7b", "clip-l-336", "vit_h")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = SesameModel(cfg)  # [SEG] 32000, pad 0, bos 1, eos 2: SyntheticTokenizer's ids
    torch.set_default_dtype(torch.float32)
    model = model.to(dtype=torch.bfloat16).eval()  # .to() keeps SAM's positional encoding float32
    return LoadedSesame(model, SyntheticTokenizer(), ClipTransform(cfg.vision.image_size),
                        SamTransform(cfg.sam.image_size))


def build_tiny_model() -> LoadedSesame:
    from model.tiny import tiny_model, tiny_tokenizer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tok, ids = tiny_tokenizer(os.path.join(root, "assets", "tiny_tokenizer"))
    model = tiny_model(ids, len(tok))
    return LoadedSesame(model, tok, ClipTransform(model.config.vision.image_size),
                        SamTransform(model.config.sam.image_size))


def synthetic_images(root: str, num_images: int, queries: int, sizes, write: bool = True) -> list[EvalImage]:
    """JPEG files with COCO-like sizes, Q queries each, half of them false premises (`write` False:
    the same list for files written before)."""
    rng = np.random.default_rng(0)
    images, sent = [], 0
    masks: dict[tuple[int, int, bool], np.ndarray] = {}  # one read-only array per size and kind, shared
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        path = os.path.join(root, f"{i:05d}.jpg")
        if write:  # only the pixels draw from rng: the list is the same either way
            cv2.imwrite(path, (rng.random((h, w, 3)) * 255).astype(np.uint8))
        qs = []
        for k in range(queries):
            expr = EXPRESSIONS[(i + k) % len(EXPRESSIONS)]
            exists = k % 2 == 0
            if (h, w, exists) not in masks:
                gt = np.zeros((h, w), np.uint8)
                if exists:
                    gt[h // 4:h // 2, w // 4:w // 2] = 1
                gt.flags.writeable = False
                masks[h, w, exists] = gt
            gt = masks[h, w, exists]
            qs.append(EvalQuery(ref_id=i * 1000 + k, sent_id=sent, sentence=expr,
                                question="<image>\n" + QUESTION.format(e=expr), gt_exists=exists,
                                gt_sent=None if exists else "blue chair", gt_mask=gt))
            sent += 1
        images.append(EvalImage(image_path=path, image_id=i, height=h, width=w, queries=qs))
    return images


def make_hook(seg_id: int, eos_id: int, seg_step: int = 3):
    """[SEG] at `seg_step` for every other query; EOS never (fixed answer length)."""
    def hook(step, logits, query):
        logits = logits.clone()
        logits[:, eos_id] = float("-inf")
        if step == seg_step:
            logits[(query >= 0) & (query % 2 == 0), seg_id] += 1e4
        return logits
    return hook


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def eval_arguments(args, out_dir: str) -> argparse.Namespace:
    """test_sesame.py's arguments for this benchmark's settings."""
    argv = ["--vis_save_path", out_dir, "--max_new_tokens", str(args.max_new_tokens), "--slots_per_group",
            str(args.slots_per_group), "--num_workers", str(args.num_workers), "--no_progress"]
    argv += ["--queries_per_batch", str(args.queries_per_batch)] if args.queries_per_batch else []
    argv += (["--cuda_graphs"] if args.cuda_graphs else []) + (["--compile_sam"] if args.compile_sam else [])
    argv += ["--column_block", str(args.column_block)] if args.column_block else []
    argv += ["--no_overlap_sam"] if args.no_overlap_sam else []
    return test_sesame.build_parser().parse_args(argv)


def new_predictor(loaded, args):
    """A predictor for these settings; the last one's engine (and its KV cache) is freed first, so each
    sizes its batches from the same free memory."""
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    eval_args = eval_arguments(args, "")
    cfg = loaded.model.config
    return build_predictor(loaded, conv_type=eval_args.conv_type, max_new_tokens=eval_args.max_new_tokens,
                           max_text_tokens=eval_args.model_max_length, config=test_sesame.engine_config(eval_args),
                           logits_hook=make_hook(cfg.seg_token_id, cfg.llm.eos_token_id))


ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


def allocator_counts(device: str) -> dict[str, int]:
    """PyTorch's CUDA allocator counters: retries (an allocation that failed, after which every cached
    block was freed, synchronously), and the cudaMalloc / cudaFree calls made; {} off CUDA."""
    if not device.startswith("cuda"):
        return {}
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def run_engine(loaded, images, args, out_dir: str, timer=None, predictor=None) -> dict:
    """One evaluation run (test_sesame.py's loop) with `predictor`, or with a new one when None.
    The summary's "allocator": the allocator counters' change over the run (what makes one run of
    the same code slower than another when memory is nearly full)."""
    if predictor is None:
        predictor = new_predictor(loaded, args)
    predictor.backend.timer = timer
    eval_args = eval_arguments(args, out_dir)
    sync(args.device)
    before = allocator_counts(args.device)
    summary = run_shard(test_sesame.eval_run(eval_args), predictor, images, test_sesame.image_reader(eval_args, None))
    sync(args.device)
    after = allocator_counts(args.device)
    summary["allocator"] = {k: after[k] - before[k] for k in after}
    predictor.backend.timer = None
    summary["engine_sizes"] = vars(predictor.backend.sizes)
    return summary


def warmed_predictor(loaded, warm, args, out_dir: str):
    """None with --fresh_predictor (every run builds its own); otherwise a new predictor that has run
    the warm-up batch once, as a long evaluation's predictor has after its first batch."""
    if args.fresh_predictor:
        return None
    predictor = new_predictor(loaded, args)
    run_engine(loaded, warm, args, out_dir, predictor=predictor)
    return predictor


def alternate_rounds(loaded, images, warm, args, tmp: str) -> tuple[Optional[dict[str, list[float]]], dict]:
    """--repeats N: N more engine runs as configured, each followed by one with --compare's flag
    toggled when given, so that both settings see the same machine at nearly the same time. Each run
    has a predictor of its own, warmed up first (not timed) unless --fresh_predictor.
    Returns queries/s per setting, in round order, and each run's allocator counters likewise."""
    if args.repeats <= 0:
        return None, {}
    settings = {"as run": args}
    if args.compare:
        toggled = argparse.Namespace(**{**vars(args), args.compare: not getattr(args, args.compare)})
        settings[f"--{args.compare} {'on' if getattr(toggled, args.compare) else 'off'}"] = toggled
    out: dict[str, list[float]] = {name: [] for name in settings}
    allocator: dict[str, list[dict]] = {name: [] for name in settings}
    for k in range(args.repeats):
        for i, (name, setting) in enumerate(settings.items()):
            where = os.path.join(tmp, f"round{k}-setting{i}")
            predictor = warmed_predictor(loaded, warm, setting, where + "-warmup")
            summary = run_engine(loaded, images, setting, where, predictor=predictor)
            out[name].append(summary["queries_per_s"])
            allocator[name].append(summary["allocator"])
            del predictor
    return out, allocator


@torch.inference_mode()
def run_original(loaded, images, args) -> tuple[int, float]:
    """The original's evaluation strategy (module docstring). Returns (queries, seconds)."""
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.model.config
    llm = model.language_model
    device = model.device
    hook = make_hook(cfg.seg_token_id, cfg.llm.eos_token_id)
    n, start = 0, None
    for idx, im in enumerate(images):
        rgb = read_eval_image(im)
        clip_px, sam_in = loaded.clip_transform(rgb), loaded.sam_transform(rgb)
        prompts = [tokenize_with_image(build_prompt(q.question, template="vicuna_v1"), tok) for q in im.queries]
        for a in range(0, len(prompts), args.original_chunk):
            warmup = idx == 0 and a == 0  # the first chunk is not timed
            if not warmup and start is None:
                sync(args.device)
                start = time.perf_counter()
            chunk = prompts[a:a + args.original_chunk]
            b = len(chunk)
            clip = clip_px[None].repeat(b, 1, 1, 1).to(device)
            sam = sam_in.pixels[None].repeat(b, 1, 1, 1).to(device)
            sam_emb = torch.cat([model.encode_images_sam(sam[r:r + 1]) for r in range(b)])  # once per query
            length = max(len(p) for p in chunk)
            input_ids = torch.full((b, length), cfg.llm.pad_token_id, dtype=torch.long, device=device)
            for r, p in enumerate(chunk):
                input_ids[r, length - len(p):] = torch.tensor(p, device=device)
            query = torch.arange(a, a + b, device=device)
            for step in range(args.max_new_tokens):
                feats = model.encode_images_clip(clip)  # inside every forward, as the original
                spliced = model.splice_image_features(input_ids, torch.ones_like(input_ids), feats)
                hidden = llm.model(inputs_embeds=spliced.embeds, use_cache=False).last_hidden_state
                logits = hook(step, llm.lm_head(hidden[:, -1]).float(), query)
                input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
            predicts_seg = spliced.token_ids[:, 1:] == cfg.seg_token_id
            for r in range(b):
                seg_h = hidden[r, :-1][predicts_seg[r]]
                if seg_h.shape[0]:
                    masks = model.seg_masks(sam_emb[r:r + 1], seg_h, [0] * seg_h.shape[0], [sam_in.resized_size],
                                            [sam_in.original_size])
                    (masks[0].logits > 0).cpu()
            if not warmup:
                n += b
    sync(args.device)
    return n, time.perf_counter() - start


def _union_length(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _read_trace(path: str) -> tuple[list[dict], list[tuple]]:
    """A torch.profiler Chrome trace's events, and its kernels as (start, end, name, stream), by start (us)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"], e.get("args", {}).get("stream"))
                     for e in events if e.get("cat") == "kernel")
    return events, kernels


def _costliest(kernels, top: int) -> list[tuple[str, float]]:
    """The `top` kernel names (first 80 characters) by summed duration, in ms."""
    from collections import Counter

    cost = Counter()
    for a, b, name, _ in kernels:
        cost[name[:80]] += b - a
    return [(k, v / 1e3) for k, v in cost.most_common(top)]


def summarize_trace(path: str, top: int = 4) -> list[dict]:
    """Per engine stage, from a torch.profiler Chrome trace of a run with a synchronising StageTimer:
    wall time, time the GPU was busy, kernels run, host launches and the costliest kernels."""
    import bisect

    events, kernels = _read_trace(path)
    ranges = {k: [] for k in STAGES}
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("name") in ranges:
            ranges[e["name"]].append((e["ts"], e["ts"] + e["dur"]))
    launches = sorted(e["ts"] for e in events if e.get("cat") == "cuda_runtime"
                      and e.get("name") in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                            "cuLaunchKernelEx", "cudaGraphLaunch"))
    starts = [k[0] for k in kernels]
    rows = []
    for stage, spans in ranges.items():
        wall = sum(b - a for a, b in spans)
        inside, n_launch = [], 0
        for a, b in spans:
            inside += kernels[bisect.bisect_left(starts, a):bisect.bisect_right(starts, b)]
            n_launch += bisect.bisect_right(launches, b) - bisect.bisect_left(launches, a)
        busy = _union_length([(a, b) for a, b, _, _ in inside])
        rows.append({"stage": stage, "wall_ms": wall / 1e3, "gpu_busy_ms": busy / 1e3, "kernels": len(inside),
                     "launches": n_launch, "top": _costliest(inside, top)})
    return rows


def profile_one_batch(loaded, images, args, out_dir: str, trace_dir: str, predictor=None) -> list[dict]:
    """One engine batch under torch.profiler; the trace is kept (gzip) in trace_dir."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    timer = StageTimer(sync=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_engine(loaded, images, args, out_dir, timer=timer, predictor=predictor)
    os.makedirs(trace_dir, exist_ok=True)
    path = os.path.join(trace_dir, "eval_trace.json")
    prof.export_chrome_trace(path)
    rows = summarize_trace(path, args.profile_top)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    os.remove(path)
    print("\n| stage (one batch, profiled) | wall ms | GPU busy ms | kernels | launches | costliest kernels (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        top = "; ".join(f"{k} {v:.1f}" for k, v in r["top"])
        print(f"| {r['stage']} | {r['wall_ms']:.1f} | {r['gpu_busy_ms']:.1f} | {r['kernels']} | {r['launches']} "
              f"| {top} |")
    return rows


def summarize_timeline(path: str, top: int = 6) -> dict:
    """From a torch.profiler Chrome trace of one whole, unsynchronised run: how long the run took on
    the GPU's clock, how much of it some kernel was running (any stream), each stream's busy time,
    and the idle gaps, each charged to the engine stage the host was in when the gap began (no stage:
    between batches, loading, records). Says whether the run is bound by the GPU's work or by the host."""
    import bisect
    from collections import Counter

    events, kernels = _read_trace(path)
    stages = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name") in STAGES)
    if not kernels:
        return {}
    begin, end = kernels[0][0], max(b for _, b, _, _ in kernels)
    streams: dict = {}
    for a, b, _, stream in kernels:
        streams.setdefault(stream, []).append((a, b))
    gaps, reach = [], begin
    for a, b, _, _ in kernels:
        if a > reach:
            gaps.append((reach, a))
        reach = max(reach, b)
    starts = [s[0] for s in stages]

    def stage_at(t: float) -> str:
        k = bisect.bisect_right(starts, t) - 1
        return stages[k][2] if k >= 0 and stages[k][1] >= t else "no stage"

    idle_by_stage = Counter()
    for a, b in gaps:
        idle_by_stage[stage_at(a)] += b - a
    # the host's whole run (RUN_RANGE), when present: how long before its first kernel and after its
    # last one it took (loading the first images; records), and when each stage began and ended in it
    run = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == RUN_RANGE]
    around = {}
    if run:
        r0, r1 = run[0]["ts"], run[0]["ts"] + run[0]["dur"]
        around = {"before_first_kernel_ms": (begin - r0) / 1e3, "after_last_kernel_ms": (r1 - end) / 1e3,
                  "host_stage_spans_ms": [(name, round((a - r0) / 1e3, 1), round((b - r0) / 1e3, 1))
                                          for a, b, name in stages]}
    return {**around, "gpu_window_ms": (end - begin) / 1e3,
            "busy_ms": _union_length([(a, b) for a, b, _, _ in kernels]) / 1e3,
            "stream_busy_ms": {str(s): _union_length(v) / 1e3 for s, v in streams.items()},
            "idle_ms_by_host_stage": {k: v / 1e3 for k, v in idle_by_stage.most_common()},
            "gaps_over_1ms": sum(1 for a, b in gaps if b - a > 1e3),
            "top_kernels_ms": _costliest(kernels, top)}


def profile_timeline(loaded, images, args, out_dir: str, trace_dir: str, predictor=None) -> dict:
    """One whole run (all images, stages not synchronised) under torch.profiler: summarize_timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function(RUN_RANGE):
            summary = run_engine(loaded, images, args, out_dir, timer=StageTimer(sync=False), predictor=predictor)
    os.makedirs(trace_dir, exist_ok=True)
    path = os.path.join(trace_dir, "eval_timeline.json")
    prof.export_chrome_trace(path)
    rows = summarize_timeline(path)
    os.remove(path)  # large; the summary is what is kept
    rows["profiled_run_s"] = summary["seconds"]
    print(f"\n| whole run, profiled ({summary['seconds']:.2f} s) | figure |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    return rows


def first_batch(images, queries_per_batch: int):
    n, count = 0, 0
    for im in images:
        if n and count + len(im.queries) > queries_per_batch:
            break
        n, count = n + 1, count + len(im.queries)
    return images[:n]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check with the tiny random model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--images", type=int, default=None, help="default 64 (tiny: 6)")
    ap.add_argument("--queries_per_image", type=int, default=None, help="default 8 (tiny: 3)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default 24 (tiny: 8)")
    ap.add_argument("--queries_per_batch", type=int, default=None, help="default: from free GPU memory")
    ap.add_argument("--memory_cap_gib", type=float, default=None,
                    help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), "
                         "as a smaller card")
    bits = ap.add_mutually_exclusive_group()
    bits.add_argument("--load_in_8bit", action="store_true", help="LLM weights in 8 bits")
    bits.add_argument("--load_in_4bit", action="store_true", help="LLM weights in 4 bits")
    ap.add_argument("--slots_per_group", type=int, default=8)
    ap.add_argument("--num_workers", type=int, default=None,
                    help="image loading threads; default 4, test_sesame.py's (tiny: 0). With the resizes on the GPU "
                         "the loader only decodes, and more threads only contend for the GIL (RESULTS.md)")
    ap.add_argument("--original_images", type=int, default=None,
                    help="images for the original's strategy, the first one a warm-up (default 5; tiny: 2)")
    ap.add_argument("--original_chunk", type=int, default=5)
    ap.add_argument("--skip_original", action="store_true")
    ap.add_argument("--cuda_graphs", action="store_true", help="decode steps replayed as CUDA graphs")
    ap.add_argument("--column_block", type=int, default=None,
                    help="with --cuda_graphs: cache columns a step reads per block (test_sesame.py's default: 256)")
    ap.add_argument("--no_overlap_sam", action="store_true",
                    help="SAM's image encoder on the main stream (the old way)")
    ap.add_argument("--compile_sam", action="store_true", help="torch.compile SAM's image encoder (compile counted "
                    "in the warm-up run, reported as cold_seconds)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="then N more rounds of the engine run in this process (machines differ, and one machine's "
                         "runs vary by several per cent: compare medians of rounds, not single runs)")
    ap.add_argument("--compare", choices=COMPARABLE, default=None,
                    help="with --repeats: each round also runs the engine with this flag toggled (A/B alternated)")
    ap.add_argument("--profile_dir", default=None,
                    help="also profile one batch (per-stage GPU busy time and top kernels; trace saved here) and one "
                         "whole unsynchronised run (GPU busy and idle time over the run, idle charged to host stages)")
    ap.add_argument("--profile_top", type=int, default=4, help="with --profile_dir: kernels listed per stage")
    ap.add_argument("--fresh_predictor", action="store_true",
                    help="every run builds its own predictor (before session 16: per-predictor state such as "
                         "captured CUDA graphs was paid again in each timed run); default: one predictor per "
                         "setting, warmed up by the first batch, as a long evaluation's is")
    args = ap.parse_args(argv)
    tiny = args.tiny
    defaults = dict(images=(6, 64), queries_per_image=(3, 8), max_new_tokens=(8, 24), num_workers=(0, 4),
                    original_images=(2, 5))
    for k, (t, f) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, t if tiny else f)
    args.device = args.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no GPU is visible")

    if args.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2 ** 30 / total))
    t0 = time.perf_counter()
    loaded = build_tiny_model() if tiny else build_full_model(args.device)
    quant = 8 if args.load_in_8bit else 4 if args.load_in_4bit else None
    if quant:
        from model.quantize import quantize_llm

        quantize_llm(loaded.model.language_model, quant, torch.device(args.device))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    sync(args.device)
    build_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else None
    sizes = [(48, 64), (64, 40)] if tiny else [(480, 640), (640, 427), (427, 640), (500, 375)]
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(os.path.join(tmp), args.images, args.queries_per_image, sizes)
        # warm-up: one full batch (kernels chosen, allocator pools sized, compilation if asked for), so
        # the figures are what a long evaluation sees per batch; its own time is reported as "cold"
        warm = first_batch(images, args.queries_per_batch or MAX_QUERIES)
        predictor = None if args.fresh_predictor else new_predictor(loaded, args)
        cold = run_engine(loaded, warm, args, os.path.join(tmp, "warmup"), predictor=predictor)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        summary = run_engine(loaded, images, args, os.path.join(tmp, "run"), predictor=predictor)
        peak_engine = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else None
        timer = StageTimer(sync=True)
        timed = run_engine(loaded, images, args, os.path.join(tmp, "timed"), timer=timer, predictor=predictor)
        profile_rows = timeline = None
        if args.profile_dir:
            profile_rows = profile_one_batch(loaded, warm, args, os.path.join(tmp, "profiled"), args.profile_dir,
                                             predictor=predictor)
            timeline = profile_timeline(loaded, images, args, os.path.join(tmp, "timeline"), args.profile_dir,
                                        predictor=predictor)
        del predictor
        rounds, rounds_allocator = alternate_rounds(loaded, images, warm, args, tmp)
        original = None
        if not args.skip_original:
            n_orig, s_orig = run_original(loaded, images[:args.original_images], args)
            original = {"queries": n_orig, "seconds": s_orig, "queries_per_s": n_orig / s_orig}

    queries = summary["queries_run"]
    qps = summary["queries_per_s"]
    stage_total = timed["seconds"]
    breakdown = {k: timer.seconds.get(k, 0.0) for k in STAGES}
    breakdown["other (loading, records)"] = max(0.0, stage_total - sum(breakdown.values()))
    waits = timed["waited_s"]  # the part of "other" the main thread spent waiting for loader / records
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    import transformers
    figures = {
        "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
        "model": "tiny random (fp32)" if tiny else "LLaMA-7B + CLIP ViT-L/14-336 + SAM ViT-H, random bf16",
        "build_s": build_s, "images": args.images, "queries": queries, "max_new_tokens": args.max_new_tokens,
        "queries_per_batch": args.queries_per_batch, "engine_sizes": summary["engine_sizes"],
        "slots_per_group": args.slots_per_group, "memory_cap_gib": args.memory_cap_gib,
        "llm_weights": f"int{quant}" if quant else "bf16", "resident_gib": resident,
        "cuda_graphs": args.cuda_graphs, "column_block": args.column_block, "compile_sam": args.compile_sam,
        "overlap_sam": not args.no_overlap_sam,
        "engine_seconds": summary["seconds"], "engine_queries_per_s": qps,
        "decode_graphs": summary.get("decode_graphs"),
        "cold_queries": cold["queries_run"], "cold_seconds": cold["seconds"], "profile": profile_rows,
        "timeline": timeline, "fresh_predictor": args.fresh_predictor,
        "breakdown_s": breakdown, "waited_s": waits, "breakdown_run_seconds": stage_total, "peak_gib": peak_engine,
        "original": original, "speedup": (qps / original["queries_per_s"]) if original else None,
        "rounds": rounds, "allocator": {"run": summary["allocator"], "synchronised run": timed["allocator"],
                                        "rounds": rounds_allocator},
    }
    print("\n| what | figure |\n|---|---|")
    print(f"| device | {device_name}, torch {torch.__version__}, transformers {transformers.__version__} |")
    print(f"| model | {figures['model']} (build {build_s:.1f} s) |")
    sizes = summary["engine_sizes"]
    print(f"| work | {args.images} images x {args.queries_per_image} queries = {queries}, answers "
          f"{args.max_new_tokens} new tokens, [SEG] in half; engine: {sizes['queries_per_batch']} queries per batch, "
          f"{sizes['sam_batch']} images per encoder call, {sizes['prefix_batch']} per prefix pass |")
    print(f"| GPU memory | cap {args.memory_cap_gib or 'none'} GiB; LLM weights {figures['llm_weights']}; "
          f"resident {resident if resident is None else round(resident, 2)} GiB |")
    print(f"| engine | **{qps:.1f} queries/s** ({summary['seconds']:.2f} s, real loop incl. loading and records; "
          f"CUDA graphs {'on' if args.cuda_graphs else 'off'}, SAM {'compiled' if args.compile_sam else 'eager'}"
          f"{', on its own stream' if args.device.startswith('cuda') and not args.no_overlap_sam else ''}) |")
    print(f"| warm-up run (first batch, cold) | {cold['queries_run']} queries in {cold['seconds']:.2f} s |")
    parts = ", ".join(f"{k} {v:.2f} s ({100 * v / stage_total:.0f}%)" for k, v in breakdown.items())
    print(f"| engine breakdown (synchronised run, {stage_total:.2f} s) | {parts}; the main thread waited for the "
          f"loader {waits['loader']:.2f} s (inside encoders: they take images as they arrive) and for records "
          f"{waits['records']:.2f} s (in other) |")
    if peak_engine is not None:
        print(f"| engine peak GPU memory | {peak_engine:.1f} GiB |")
    for name, figures_of in (rounds or {}).items():
        runs = ", ".join(f"{q:.1f}" for q in figures_of)
        print(f"| {len(figures_of)} more rounds, {name} | {runs} queries/s (median "
              f"**{statistics.median(figures_of):.1f}**) |")
    if summary["allocator"]:
        def counts(c: dict) -> str:
            return "/".join(str(c[k]) for k in ALLOCATOR_COUNTS)
        runs = "; ".join(f"{name}: " + ", ".join(counts(c) for c in cs) for name, cs in rounds_allocator.items())
        print(f"| allocator retries / cudaMalloc / cudaFree per run | run {counts(summary['allocator'])}; synchronised "
              f"run {counts(timed['allocator'])}{'; ' + runs if runs else ''} |")
    if original:
        print(f"| original strategy ({original['queries']} queries after a warm-up chunk) | "
              f"**{original['queries_per_s']:.2f} queries/s** ({original['seconds']:.1f} s) |")
        print(f"| speed-up | **{figures['speedup']:.1f}x** |")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
