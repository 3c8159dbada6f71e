"""model/pil_resize.py on a GPU: Pillow's bytes, the processors' encoder inputs, and the engine
answering deferred (decoded-only) images as it answers host-preprocessed ones. CPU-only machines
(CI) skip this file; tests/test_pil_resize.py runs the same checks on the CPU."""
import numpy as np
import pytest
import torch
from test_eval_engine import _hook, _work
from test_pil_resize import check_resize, check_transforms

from engine.batched import BatchedInference
from engine.config import EngineConfig
from model.builder import LoadedSesame
from model.predictor import SesamePredictor
from model.tiny import tiny_model
from model.transforms import ClipTransform, SamTransform

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_resize_gives_pillows_bytes_on_the_gpu():
    check_resize("cuda")


def test_tensor_transforms_give_the_processors_inputs_on_the_gpu():
    check_transforms("cuda")


def test_engine_on_the_gpu_answers_deferred_images_as_preprocessed_ones(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer), seed=3).to("cuda")
    loaded = LoadedSesame(model, tokenizer, ClipTransform(model.config.vision.image_size),
                          SamTransform(model.config.sam.image_size))
    predictor = SesamePredictor(loaded, conv_type="llava_v1")
    works = _work(model, tokenizer, [(40, 60), (52, 33), (20, 70)], [2, 3, 1])
    deferred = []
    for i, w in enumerate(works):  # the images _work drew, decoded only, page-locked as the loader leaves them
        img = (np.random.default_rng(i).random((*w.original_size, 3)) * 255).astype(np.uint8)
        d = predictor.prepare(img, w.prompts, defer=True)
        deferred.append(type(d)(None, None, d.resized_size, d.original_size, d.prompts,
                                raw=type(d.raw)(d.raw.rgb.pin_memory(), d.raw.clip, d.raw.sam)))
    hook = _hook(token_ids)
    want = BatchedInference(model, EngineConfig(sam_batch=2), logits_hook=hook).run(works, 6)
    got = BatchedInference(model, EngineConfig(sam_batch=2), logits_hook=hook).run(deferred, 6)
    for gs, ws in zip(got, want):
        for g, w in zip(gs, ws):
            assert g.output_ids == w.output_ids and g.exists == w.exists
            assert torch.equal(g.masks, w.masks) and torch.equal(g.seg_hidden, w.seg_hidden)
