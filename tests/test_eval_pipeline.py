"""The evaluation runner (evaluation/) as test_sesame.py drives it, on a tiny model and generated images:
records, resume, shards, metrics."""
import json
import os
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

import test_sesame
from dataset.eval_report import EvalDataError, EvalSetReport
from dataset.eval_sets import EvalImage, EvalQuery
from engine.build import build_predictor, load_predictor
from evaluation.metrics import evaluate_records
from evaluation.records import merge_shards, read_shard, shard_dir, shard_path
from evaluation.runner import quick_gil_handoff, run_shard
from model.builder import LoadedSesame
from model.tiny import tiny_model
from model.transforms import ClipTransform, SamTransform
from utils import mask_io
from utils.errors import InputError

SIZES = [(40, 60), (64, 32), (23, 77), (50, 50), (33, 41)]
QUERIES = [3, 1, 5, 2, 4]


def _images(root):
    rng = np.random.default_rng(0)
    images, sent = [], 0
    for i, ((h, w), n) in enumerate(zip(SIZES, QUERIES)):
        path = os.path.join(root, f"img_{i}.png")
        cv2.imwrite(path, (rng.random((h, w, 3)) * 255).astype(np.uint8))
        queries = []
        for k in range(n):
            exists = (i + k) % 3 != 0
            gt = np.zeros((h, w), np.uint8)
            if exists:
                gt[h // 4: h // 2 + k, w // 5: w // 2] = 1
                gt[0, :] = 255 if k == 1 else gt[0, :]
            queries.append(EvalQuery(ref_id=100 + i, sent_id=sent, sentence=f"thing {sent}",
                                     question=f"<image>\nIs there a thing {sent} in this image?",
                                     gt_exists=exists, gt_sent=None if exists else "blue circle", gt_mask=gt,
                                     extra={"is_sentence": bool(k % 2)}))
            sent += 1
        images.append(EvalImage(image_path=path, image_id=i, height=h, width=w, queries=queries))
    return images


def content_hook(seg_id, eos_id):
    """Decisions that depend on what a query's logits say, never on its row: identical under any batching."""
    def hook(step, logits, query):
        logits = logits.clone()
        # a number that differs between queries (their logits do) but not between batchings
        h = (logits[:, :64].sum(-1) * 100).floor().long()
        if step == 0:
            logits[h % 2 == 0, seg_id] += 1e4
        if step == 2:
            logits[h % 3 == 0, eos_id] += 1e4
        return logits
    return hook


@pytest.fixture(scope="module")
def loaded(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer), seed=1)
    return LoadedSesame(model, tokenizer, ClipTransform(model.config.vision.image_size),
                        SamTransform(model.config.sam.image_size))


def _args(out, *extra):
    return test_sesame.build_parser().parse_args(
        ["--val_dataset", "fprefcoco", "--vis_save_path", str(out), "--max_new_tokens", "6", "--num_workers", "0",
         "--no_progress", "--queries_per_batch", "4", *extra])


def _run(loaded, images, out, *extra, hook=None):
    args = _args(out, *extra)
    cfg = loaded.model.config
    predictor = build_predictor(loaded, conv_type=args.conv_type, max_new_tokens=args.max_new_tokens,
                                max_text_tokens=args.model_max_length, config=test_sesame.engine_config(args),
                                logits_hook=hook or content_hook(cfg.seg_token_id, cfg.llm.eos_token_id))
    return run_shard(test_sesame.eval_run(args), predictor, images, test_sesame.image_reader(args, None))


def _by_key(records):
    return {r.key: r for r in records}


def test_records_and_metrics(tmp_path, loaded):
    images = _images(str(tmp_path))
    summary = _run(loaded, images, tmp_path / "out")
    assert summary["queries_run"] == sum(QUERIES) and summary["queries_skipped"] == 0
    records = read_shard(shard_path(str(tmp_path / "out"), "fprefcoco", "val", 0, 1))
    assert len(records) == sum(QUERIES)
    assert {r.key for r in records} == {(im.image_id, q.ref_id, q.sent_id) for im in images for q in im.queries}
    assert any(r.pred_exists for r in records) and any(not r.pred_exists for r in records)
    assert any(r.num_seg for r in records)
    for r in records:
        assert r.pred_exists == (r.pred_mask is not None)  # See: [SEG] with a non-empty mask
        assert (r.gt_mask is not None) == r.gt_exists
        assert "</s>" not in r.answer and r.question.startswith("<image>\n")
    assert any(r.gt_ignore for r in records)
    from evaluation.shard_scores import load_shard_scores, scores_path  # the worker scored its own shard
    shard = shard_path(str(tmp_path / "out"), "fprefcoco", "val", 0, 1)
    assert os.path.exists(scores_path(shard)) and len(load_shard_scores(shard)) == len(records)
    args = _args(tmp_path / "out", "--cmd", "metrics")
    result = test_sesame.run_metrics(args)
    assert result["complete"] and result["world_size"] == 1
    assert result["metrics"] == json.loads(json.dumps(evaluate_records(records, "fprefcoco")))
    see = np.mean([r.pred_exists == r.gt_exists for r in records])
    assert result["metrics"]["overall"]["see"] == pytest.approx(see)
    with open(os.path.join(shard_dir(str(tmp_path / "out"), "fprefcoco", "val"), "metrics.json")) as f:
        assert json.load(f)["metrics"]["overall"]["counts"]["queries"] == sum(QUERIES)
    # a rerun finds everything done
    again = _run(loaded, images, tmp_path / "out")
    assert again["queries_run"] == 0 and again["queries_skipped"] == sum(QUERIES)


def test_records_take_the_backends_rles_when_it_made_them(tmp_path, loaded, monkeypatch):
    """The engine's own RLEs (EngineConfig.mask_rles, on by default on CUDA) give the records that
    host encoding gives."""
    images = _images(str(tmp_path))
    _run(loaded, images, tmp_path / "host")
    config = test_sesame.engine_config
    monkeypatch.setattr(test_sesame, "engine_config", lambda args: replace(config(args), mask_rles=True))
    calls = []
    encode = mask_io.encode_optional
    monkeypatch.setattr(mask_io, "encode_optional", lambda mask: calls.append(1) or encode(mask))
    _run(loaded, images, tmp_path / "engine")
    assert not calls  # no record was encoded on the host
    host, engine = (_by_key(read_shard(shard_path(str(tmp_path / d), "fprefcoco", "val", 0, 1)))
                    for d in ("host", "engine"))
    assert host.keys() == engine.keys() and any(r.pred_mask for r in host.values())
    for key, record in host.items():
        assert engine[key].pred_mask == record.pred_mask and engine[key].pred_exists == record.pred_exists


def test_killed_then_resumed_equals_uninterrupted(tmp_path, loaded, monkeypatch):
    images = _images(str(tmp_path))
    _run(loaded, images, tmp_path / "full")
    full = read_shard(shard_path(str(tmp_path / "full"), "fprefcoco", "val", 0, 1))

    from evaluation import records as records_mod
    original_write = records_mod.ShardWriter.write
    calls = {"n": 0}

    def dying_write(self, recs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while the third batch was being written
        return original_write(self, recs)

    monkeypatch.setattr(records_mod.ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(loaded, images, tmp_path / "resumed")
    monkeypatch.setattr(records_mod.ShardWriter, "write", original_write)
    path = shard_path(str(tmp_path / "resumed"), "fprefcoco", "val", 0, 1)
    partial = read_shard(path)
    assert 0 < len(partial) < sum(QUERIES)
    with open(path, "a") as f:  # the kill also tore a line
        f.write('{"image_id": 3, "ref_id": 10')
    with pytest.raises(RuntimeError, match="not finished"):
        test_sesame.run_metrics(_args(tmp_path / "resumed", "--cmd", "metrics"))
    summary = _run(loaded, images, tmp_path / "resumed")
    assert summary["queries_skipped"] == len(partial)
    assert summary["queries_run"] == sum(QUERIES) - len(partial)
    resumed = read_shard(path)
    assert len(resumed) == sum(QUERIES)
    assert _by_key(resumed) == _by_key(full)


def test_resume_answers_a_partly_recorded_image_whole(tmp_path, loaded, monkeypatch):
    """A kill can leave some of an image's records on disk. The resumed run decodes all of that image's
    queries together again (as an uninterrupted run did) and writes only the missing records."""
    from engine.batched import BatchedInference

    images = _images(str(tmp_path))
    _run(loaded, images, tmp_path / "full")
    full = shard_path(str(tmp_path / "full"), "fprefcoco", "val", 0, 1)
    with open(full) as f:
        lines = f.readlines()
    image_of = [json.loads(line)["image_id"] for line in lines]
    keep = [line for line, i in zip(lines, image_of) if i == 0] + [lines[image_of.index(2)]]  # image 2: 1 of 5
    part = shard_path(str(tmp_path / "part"), "fprefcoco", "val", 0, 1)
    os.makedirs(os.path.dirname(part))
    with open(part, "w") as f:
        f.writelines(keep)
    prompts_per_image = []
    original_run = BatchedInference.run

    def spy(self, works, max_new_tokens):
        works = list(works)
        prompts_per_image.extend(len(w.prompts) for w in works)
        return original_run(self, works, max_new_tokens)

    monkeypatch.setattr(BatchedInference, "run", spy)
    summary = _run(loaded, images, tmp_path / "part")
    assert summary["queries_run"] == sum(QUERIES) - len(keep) and summary["queries_skipped"] == len(keep)
    assert prompts_per_image == QUERIES[1:]  # image 2 with all of its 5 queries
    assert _by_key(read_shard(part)) == _by_key(read_shard(full))


def test_two_shards_cover_every_query_once(tmp_path, loaded):
    images = _images(str(tmp_path))
    _run(loaded, images, tmp_path / "one")
    single = _by_key(read_shard(shard_path(str(tmp_path / "one"), "fprefcoco", "val", 0, 1)))
    for p in range(2):  # with 2 loader threads
        _run(loaded, images, tmp_path / "two", "--process_num", str(p), "--world_size", "2", "--num_workers", "2")
    per_shard = [read_shard(shard_path(str(tmp_path / "two"), "fprefcoco", "val", p, 2)) for p in range(2)]
    assert all(per_shard)
    assert {r.image_id for r in per_shard[0]}.isdisjoint({r.image_id for r in per_shard[1]})
    merged = merge_shards(shard_dir(str(tmp_path / "two"), "fprefcoco", "val"))
    assert not merged.incomplete and len(merged.records) == sum(QUERIES)
    assert _by_key(merged.records) == single


def test_bad_input_is_named(tmp_path, loaded):
    images = _images(str(tmp_path))
    os.remove(images[1].image_path)
    with pytest.raises(EvalDataError, match="img_1.png: image 1: no such file"):
        _run(loaded, images, tmp_path / "a")
    images = _images(str(tmp_path))
    images[2].queries[1].sent_id = images[2].queries[0].sent_id
    with pytest.raises(ValueError, match="occurs twice"):
        _run(loaded, images, tmp_path / "b")
    images = _images(str(tmp_path))
    with pytest.raises(ValueError, match="question too long.*limit is 10"):
        _run(loaded, images, tmp_path / "c", "--model_max_length", "10")
    with pytest.raises(SystemExit):
        test_sesame.build_parser().parse_args(["--val_dataset", "coco"])


def test_unreadable_image_skipped_and_counted_with_on_error_skip(tmp_path, loaded):
    """--on_error skip: a corrupt image's queries leave the run, the shard still finishes, and the
    metrics say what was skipped and that the set is not complete."""
    images = _images(str(tmp_path))
    with open(images[2].image_path, "wb") as f:
        f.write(b"not an image")
    report = EvalSetReport()
    report.start("fprefcoco", "val", "skip")
    report.found_images = report.built_images = len(images)
    report.found_refs = report.built_refs = len({q.ref_id for im in images for q in im.queries})
    report.found_queries = report.built_queries = sum(QUERIES)
    args = _args(tmp_path / "skip", "--on_error", "skip")
    cfg = loaded.model.config
    predictor = build_predictor(loaded, conv_type=args.conv_type, max_new_tokens=args.max_new_tokens,
                                config=test_sesame.engine_config(args),
                                logits_hook=content_hook(cfg.seg_token_id, cfg.llm.eos_token_id))
    summary = run_shard(test_sesame.eval_run(args), predictor, images, test_sesame.image_reader(args, report), report)
    assert summary["queries_unreadable"] == QUERIES[2] and summary["queries_run"] == sum(QUERIES) - QUERIES[2]
    result = test_sesame.run_metrics(_args(tmp_path / "skip", "--cmd", "metrics"))
    assert not result["complete"]  # the shard finished, but not every query of the set was evaluated
    assert result["set"]["skipped"]["queries"] == QUERIES[2] and result["set"]["skipped"]["images"] == 1
    assert list(result["set"]["skipped"]["reasons"]) == ["image/not_an_image"]
    assert result["metrics"]["overall"]["counts"]["queries"] == sum(QUERIES) - QUERIES[2]


def test_visualize_writes_overlays(tmp_path, loaded):
    images = _images(str(tmp_path))[:2]
    _run(loaded, images, tmp_path / "vis", "--visualize")
    vis = os.path.join(shard_dir(str(tmp_path / "vis"), "fprefcoco", "val"), "vis")
    folders = sorted(os.listdir(vis))
    assert len(folders) == QUERIES[0] + QUERIES[1]
    assert {"seg_mask.png", "seg_overlay.jpg", "answer.txt"} <= set(os.listdir(os.path.join(vis, folders[0])))


def test_visualize_sasp_maps(tmp_path, tokenizer, token_ids):
    """READ model (SasP switched on by flag) with [SEG] in every answer: heat map + points PNGs."""
    from model.config import SasPConfig

    model = tiny_model(token_ids, len(tokenizer), seed=1, sasp=SasPConfig(num_points=5))
    loaded = LoadedSesame(model, tokenizer, ClipTransform(model.config.vision.image_size),
                          SamTransform(model.config.sam.image_size))
    images = _images(str(tmp_path))[:1]

    def always_seg(step, logits, query):
        logits = logits.clone()
        logits[:, token_ids.seg if step == 0 else token_ids.eos] += 1e4
        return logits
    _run(loaded, images, tmp_path / "read", "--visualize", hook=always_seg)
    vis = os.path.join(shard_dir(str(tmp_path / "read"), "fprefcoco", "val"), "vis")
    for folder in os.listdir(vis):
        assert {"sasp.png", "seg_mask.png", "seg_overlay.jpg"} <= set(os.listdir(os.path.join(vis, folder)))
    assert len(os.listdir(vis)) == QUERIES[0]


def test_load_predictor_sasp_flags():
    parse = test_sesame.build_parser().parse_args
    base = ["--pretrained_model_path", "tiny-random", "--device", "cpu", "--precision", "fp32"]
    assert load_predictor(parse(base)).model.config.sasp is None
    cfg = load_predictor(parse(base + ["--use_sasp", "--num_points", "7"])).model.config.sasp
    assert cfg is not None and cfg.num_points == 7 and cfg.t_pos == 0.8
    with pytest.raises(InputError, match="use_sasp"):
        load_predictor(parse(base + ["--t_pos", "0.6"]))


def test_records_follow_input_order(tmp_path, loaded):
    """Records of several batches, saved by the background writer while later batches run, land in
    the file in input order, with 2 loader threads too."""
    images = _images(str(tmp_path))
    expected = [(im.image_id, q.ref_id, q.sent_id) for im in images for q in im.queries]
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        summary = _run(loaded, images, out, "--num_workers", workers, "--queries_per_batch", "3")
        assert summary["queries_run"] == len(expected)
        assert [r.key for r in read_shard(shard_path(str(out), "fprefcoco", "val", 0, 1))] == expected


def test_gil_handoff_is_scoped():
    import sys

    before = sys.getswitchinterval()
    with quick_gil_handoff(0.0005):
        assert sys.getswitchinterval() == min(before, 0.0005)
    assert sys.getswitchinterval() == before


def test_out_of_memory_halves_the_batch_and_loses_no_record(tmp_path, loaded, monkeypatch, capsys):
    """A run that runs out of GPU memory is retried in smaller runs (the engine halves its sizes, and
    splits an image's queries when they alone are too many); the records are those of a run that
    never ran out."""
    from engine.batched import BatchedInference

    images = _images(str(tmp_path))
    _run(loaded, images, tmp_path / "full", "--queries_per_batch", "8")
    original = BatchedInference._run_prefix
    sizes = []

    def tight(self, images, clip, sam, prefix, queries, max_new_tokens):
        sizes.append(len(queries))
        if len(queries) > 3:  # "memory" for 3 queries decoding together
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, images, clip, sam, prefix, queries, max_new_tokens)

    monkeypatch.setattr(BatchedInference, "_run_prefix", tight)
    summary = _run(loaded, images, tmp_path / "tight", "--queries_per_batch", "8")
    assert summary["queries_run"] == sum(QUERIES)
    err = capsys.readouterr().err
    assert "out of GPU memory; retrying with 4 queries per batch" in err and "with 2 queries" in err
    full = read_shard(shard_path(str(tmp_path / "full"), "fprefcoco", "val", 0, 1))
    tight_records = read_shard(shard_path(str(tmp_path / "tight"), "fprefcoco", "val", 0, 1))
    assert _by_key(tight_records) == _by_key(full) and [r.key for r in tight_records] == [r.key for r in full]
    assert max(sizes) > 3 and 5 not in sizes[sizes.index(2):]  # image 2's 5 queries went in smaller parts
    # nothing fits even at the smallest sizes: the error stands
    monkeypatch.setattr(BatchedInference, "_run_prefix", lambda *a: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _run(loaded, images[:1], tmp_path / "none", "--queries_per_batch", "8")
