"""Checkpoint loading: wall time and memory of `model.builder.load_pretrained`.

The loader builds the model on the meta device and streams shards into the target dtype, so host
memory should grow by about the loaded model (CPU target) or stay near the import baseline (GPU
target), never by a full float32 copy.

Usage:
  python benchmarks/load_checkpoint.py --path tsunghanwu/SESAME --device cuda        # a real release
  python benchmarks/load_checkpoint.py --synthetic --layers 4 --device cpu          # LLaMA-7B-wide, fp32 files
  python benchmarks/load_checkpoint.py --tiny                                       # CPU smoke check
--synthetic writes a float32 release (7B width, `--layers` layers, SAM ViT-B, tiny CLIP) to a
temporary directory and loads it in bf16 in a fresh process. peak_rss counts the pages of the
memory-mapped shard being read (reclaimable page cache), so it can exceed baseline + model by up to
one shard.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_gib(kind: str = "VmRSS") -> float:
    """Resident memory from /proc/self/status: VmRSS (all), RssAnon (heap: what a float32 copy
    would show up in), RssFile (pages of memory-mapped shards: page cache the kernel can drop)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 2**20
    raise KeyError(kind)


def load(path: str, device: str, dtype_name: str, vision_tower) -> dict:
    import torch

    from model.builder import load_pretrained

    base = rss_gib()
    peak_anon = [rss_gib("RssAnon")]
    done = threading.Event()

    def sample():  # the anonymous-memory peak is what a full float32 copy would raise
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], rss_gib("RssAnon"))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    loaded = load_pretrained(path, device=device, dtype=getattr(torch, dtype_name), vision_tower=vision_tower)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - t0
    done.set()
    sampler.join()
    params = sum(p.numel() for p in loaded.model.parameters())
    report = {"path": path, "device": device, "dtype": dtype_name, "load_s": round(seconds, 2),
              "params_B": round(params / 1e9, 3), "rss_baseline_GiB": round(base, 2),
              "rss_after_GiB": round(rss_gib(), 2), "rss_anon_after_GiB": round(rss_gib("RssAnon"), 2),
              "rss_file_after_GiB": round(rss_gib("RssFile"), 2),
              "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "peak_rss_anon_GiB": round(peak_anon[0], 2),
              "model_GiB": round(sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**30, 2)}
    if device.startswith("cuda"):
        report["gpu_allocated_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return report


def write_synthetic(out_dir: str, layers: int) -> None:
    import torch

    from model.checkpoint import save_released
    from model.config import SesameConfig
    from model.sesame import SesameModel
    from model.tiny import llama_sized_sentencepiece, tiny_tokenizer, write_clip_checkpoint

    tok_dir = os.path.join(out_dir, "_sp")
    llama_sized_sentencepiece(tok_dir)
    tokenizer, ids = tiny_tokenizer(tok_dir)
    cfg = SesameConfig.preset("llama-7b", "tiny", "vit_b")
    cfg.llm.num_hidden_layers = layers
    cfg.use_token_ids(ids)
    torch.set_default_dtype(torch.bfloat16)  # keep the writer small; the files are float32
    model = SesameModel(cfg)
    torch.set_default_dtype(torch.float32)
    clip_dir = os.path.join(out_dir, "vision_tower")
    write_clip_checkpoint(model.vision_tower.float(), clip_dir)
    save_released(model, tokenizer, out_dir, dtype=torch.float32, vision_tower=clip_dir, max_shard_size="2GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="checkpoint directory or hub id")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check on a tiny written release")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--vision_tower", default=None)
    ap.add_argument("--_load_only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._load_only or args.path and not (args.tiny or args.synthetic):
        print(json.dumps(load(args.path, args.device, args.dtype, args.vision_tower)))
        return
    if not (args.tiny or args.synthetic):
        ap.error("give --path, --synthetic or --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        if args.tiny:
            from model.tiny import write_tiny_released
            write_tiny_released(tmp)
            device = "cpu"
        else:
            write_synthetic(tmp, args.layers)
            device = args.device
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.startswith("pytorch_model"))
        print(f"wrote {size / 2**30:.2f} GiB of float32 shards in {time.time() - t0:.1f}s", flush=True)
        # load in a fresh process so the writer's memory does not count
        cmd = [sys.executable, os.path.abspath(__file__), "--_load_only", "--path", tmp, "--device", device,
               "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        report = json.loads(out)
        report["files_fp32_GiB"] = round(size / 2**30, 2)
        print(json.dumps(report))


if __name__ == "__main__":
    main()
