"""Single-query latency: what a person waits for in demo.py and web_demo.py.

Builds the full-size architecture (LLaMA-7B, CLIP ViT-L/14-336, SAM ViT-H) with random bf16 weights on
the GPU and times one image + one question with a 24-token answer holding a [SEG] (forced by a logits
hook; EOS suppressed, so every answer has the full length):

- demo path: image file -> `app.query.run_query` (decode the JPEG, both encoders, the answer, the
  mask at the original size, PNG/JPEG/JSON files written), the predictor the demo builds
  (the engine, `EngineConfig.interactive()`: decode steps replayed as CUDA graphs);
- predictor alone: `SesamePredictor.ask` on the decoded image (preprocessing + engine + masks);
- reference: `SesameModel.predict` (transformers' LlamaModel with its KV cache), the way every
  query ran before the engine served single queries.

Cold = the first query after the model is built (CUDA graphs captured, kernels chosen); warm = p50 /
p90 over --repeats more. `--load_in_8bit / --load_in_4bit` quantise the LLM first and report the GPU
memory it then holds and the query's peak.

    python benchmarks/latency.py                 # GPU, full size
    python benchmarks/latency.py --load_in_4bit  # weight-only 4-bit LLM
    python benchmarks/latency.py --tiny          # CPU smoke check, tiny random model
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from eval_throughput import QUESTION, build_full_model, build_tiny_model, sync  # noqa: E402

from app.query import QuerySettings, run_query  # noqa: E402
from engine import EngineConfig, build_predictor  # noqa: E402
from model.quantize import quantize_llm  # noqa: E402


def forced_answer(seg_id: int, eos_id: int, length: int, seg_step: int = 3):
    """Row hook: [SEG] at `seg_step`, EOS only at the last step, so answers have `length` tokens."""
    def hook(step, logits, rows):  # noqa: ARG001 - the engine's hook signature
        logits = logits.clone()
        logits[:, eos_id] = float("-inf") if step < length - 1 else 1e4
        if step == seg_step:
            logits[:, seg_id] += 1e4
        return logits
    return hook


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def summary(times: list[float]) -> dict:
    return {"cold_s": times[0], "p50_s": statistics.median(times[1:]), "p90_s": percentile(times[1:], 0.9),
            "repeats": len(times) - 1}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--answer_tokens", type=int, default=24)
    ap.add_argument("--image_hw", type=int, nargs=2, default=(480, 640))
    ap.add_argument("--no_graphs", action="store_true", help="decode steps without CUDA graphs")
    ap.add_argument("--compile_sam", action="store_true")
    ap.add_argument("--no_overlap_sam", action="store_true", help="SAM's image encoder on the main stream")
    bits = ap.add_mutually_exclusive_group()
    bits.add_argument("--load_in_8bit", action="store_true")
    bits.add_argument("--load_in_4bit", action="store_true")
    ap.add_argument("--skip_reference", action="store_true")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    on_gpu = device.startswith("cuda")

    loaded = build_tiny_model() if args.tiny else build_full_model(device)
    model = loaded.model
    quant = 8 if args.load_in_8bit else 4 if args.load_in_4bit else None
    if quant:
        quantize_llm(model.language_model, quant, torch.device(device))
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2 ** 30 if on_gpu else None
    cfg = model.config
    hook = forced_answer(cfg.seg_token_id, cfg.llm.eos_token_id, args.answer_tokens)
    engine = EngineConfig.interactive()
    engine.cuda_graphs = not args.no_graphs
    engine.compile_sam = args.compile_sam
    engine.overlap_sam = not args.no_overlap_sam
    predictor = build_predictor(loaded, max_new_tokens=args.answer_tokens, config=engine, logits_hook=hook)

    h, w = args.image_hw
    question = QUESTION.format(e="the man in red")
    figures = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
               "model": "tiny random" if args.tiny else "LLaMA-7B + CLIP ViT-L/14-336 + SAM ViT-H, random bf16",
               "llm_weights": f"int{quant}" if quant else "bf16", "answer_tokens": args.answer_tokens,
               "cuda_graphs": engine.cuda_graphs, "compile_sam": args.compile_sam,
               "overlap_sam": engine.overlap_sam, "image": f"{w}x{h} JPEG",
               "resident_gib": resident}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.jpg")
        cv2.imwrite(path, (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8))
        settings = QuerySettings(vis_save_dir=os.path.join(tmp, "out"))
        demo_times = [timed(lambda: run_query(predictor, settings, path, question), device)
                      for _ in range(args.repeats + 1)]
        rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        answer = predictor.ask(rgb, question)
        assert answer.num_seg == 1 and len(answer.output_ids) == args.answer_tokens, answer
        ask_times = [timed(lambda: predictor.ask(rgb, question), device) for _ in range(args.repeats + 1)]
    figures["demo_path"] = summary(demo_times)
    figures["predictor_ask"] = summary(ask_times)
    figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None
    if not args.skip_reference:
        work = predictor.prepare(rgb, [predictor.prompt_ids(question)])
        sam = work.sam_pixels

        def reference():
            model.predict(work.clip_pixels[None], sam[None], [work.resized_size], [work.original_size],
                          work.prompts, [0], max_new_tokens=args.answer_tokens,
                          logits_hook=lambda step, logits: hook(step, logits, None))
        figures["reference_predict"] = summary([timed(reference, device) for _ in range(args.repeats + 1)])

    print("\n| what | cold | warm p50 | warm p90 |\n|---|---|---|---|")
    for name in ("demo_path", "predictor_ask", "reference_predict"):
        if name in figures:
            f = figures[name]
            print(f"| {name} | {f['cold_s']:.3f} s | {f['p50_s']:.3f} s | {f['p90_s']:.3f} s |")
    if on_gpu:
        print(f"| GPU memory | resident {resident:.2f} GiB, peak {figures['peak_gib']:.2f} GiB |  |  |")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
