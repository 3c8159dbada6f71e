"""See, Say and Segment in the browser, with a JSON API beside the page.

    python web_demo.py                                    # the built-in Shapes model, http://127.0.0.1:7860
    python web_demo.py --pretrained_model_path tsunghanwu/SESAME --port 8080
    curl -F image=@assets/shapes.jpg -F question="Is there a red square?" http://127.0.0.1:7860/api/segment

The page: upload an image (or pick an example), ask, and get the answer, a See badge, the mask
overlay, each [SEG]'s mask and, for SasP models, the similarity map with its points. The API
returns the answer, See and the masks as COCO RLE (app/web.py says the format). One question is
answered at a time; up to --max_queue more wait, further ones are refused until there is room.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from app.web_service import WebSettings
from model.builder import TINY_RANDOM
from utils.errors import InputError, add_debug_flag

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILT_IN_MODEL = os.path.join(ROOT, "assets", "shapes_sesame")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from engine.build import add_predictor_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_predictor_arguments(p)
    p.set_defaults(pretrained_model_path=BUILT_IN_MODEL)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 serves other machines too")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--max_queue", type=int, default=WebSettings.max_queue,
                   help="requests that may wait while one is answered; more are refused until there is room")
    g.add_argument("--max_upload_mb", type=int, default=WebSettings.max_upload_mb, help="larger uploads are refused")
    g.add_argument("--max_image_pixels", type=int, default=WebSettings.max_image_pixels,
                   help="larger images are downscaled for the model; masks come back at the image's own size")
    add_debug_flag(p)
    args = p.parse_args(argv)
    for name in ("max_queue", "max_upload_mb", "max_image_pixels"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be in 1..65535, got {args.port}")
    return args


def model_note(args: argparse.Namespace, predictor) -> str:
    sasp = predictor.model.config.sasp
    parts = [f"Model: `{args.pretrained_model_path}`", f"{predictor.model.device} {args.precision}",
             f"SasP on ({sasp.num_points} points)" if sasp is not None else "SasP off"]
    if args.pretrained_model_path == TINY_RANDOM:
        parts.append("an untrained, randomly initialised model: its answers are gibberish")
    return " · ".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    from app.web import build_app, make_server
    from app.web_service import AnswerService
    from engine.build import load_predictor, resolve_device_and_precision

    args = parse_args(argv)
    if args.pretrained_model_path == BUILT_IN_MODEL and not os.path.isdir(BUILT_IN_MODEL):
        raise InputError(f"the built-in Shapes model is missing ({BUILT_IN_MODEL}: it ships in the "
                         "repository; a partial checkout?); name a checkpoint with --pretrained_model_path, e.g. "
                         "tiny-random (untrained, for trying the page) or tsunghanwu/SESAME")
    resolve_device_and_precision(args)
    print(f"Loading {args.pretrained_model_path} ({args.device}, {args.precision}) ...", file=sys.stderr, flush=True)
    predictor = load_predictor(args)
    if args.pretrained_model_path == TINY_RANDOM:
        print("note: tiny-random is an untrained, randomly initialised model: its answers are gibberish, "
              "but every step of inference is the real one.", file=sys.stderr, flush=True)
    settings = WebSettings(max_image_pixels=args.max_image_pixels, max_upload_mb=args.max_upload_mb,
                           max_queue=args.max_queue)
    server = make_server(build_app(AnswerService(predictor, settings), model_note=model_note(args, predictor)),
                         args.host, args.port)
    print(f"Serving the web demo on http://{args.host}:{args.port} (JSON API: POST /api/segment); Ctrl-C stops",
          file=sys.stderr, flush=True)
    server.run()
    # Only Ctrl-C / SIGTERM end run() here. uvicorn re-raises the signal after its shutdown, from inside
    # asyncio.run, yet a CI run once saw run() return and the script exit 0 (a timing race, cause not
    # pinned down). Report the interrupt in every case.
    raise KeyboardInterrupt


if __name__ == "__main__":
    from utils.errors import run_main

    sys.exit(run_main(main))
