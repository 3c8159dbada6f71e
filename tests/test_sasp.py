"""READ's Similarity-as-Points: selection, geometry, refinement, and the plug-in in SesameModel."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_inputs import encoder_inputs as _inputs
from model_inputs import random_image as _image
from model_inputs import train_batch as _batch

from model.batch import SesameBatch
from model.config import SasPConfig
from model.conversation import build_prompt, tokenize_with_image
from model.lora import apply_lora, set_trainable
from model.sam import decode_masks, masks_at_original_size
from model.sasp import (
    FullMapFactors,
    add_sasp_arguments,
    cell_centres,
    coarse_grid,
    crop_padding,
    full_map_factors,
    full_resolution_map,
    linear_resize_matrix,
    min_max,
    refine_points,
    refine_points_dense,
    sasp_config_from_args,
    select_cells,
    similarity_as_points,
    to_sam_frame,
    validate_sasp_config,
)
from model.tiny import tiny_model

TINY_CLIP = 112  # tiny CLIP crop side: an 8 x 8 grid of image tokens


# --- selection on hand-made grids ---------------------------------------------------------------
def test_selection_thresholds_and_order():
    grid = torch.tensor([[[0.50, 0.90, 0.10, 0.85],
                          [0.00, 0.30, 1.00, 0.20],
                          [0.80, 0.15, 0.79, 0.21]]])
    cells, labels, valid = select_cells(grid, num_points=12, t_pos=0.8, t_neg=0.2)
    # positives >= 0.8 highest first (0.8 itself included), negatives in [0, 0.2] lowest first
    # (0.2 included), then the neutral rest in raster order
    expected = [6, 1, 3, 8,   4, 2, 9, 7,   0, 5, 10, 11]
    assert cells[0].tolist() == expected
    assert labels[0].tolist() == [1] * 4 + [0] * 4 + [-1] * 4
    assert valid.all()


def test_selection_cap_keeps_priority_and_ties_in_raster_order():
    grid = torch.tensor([[[0.9, 1.0, 0.9], [0.1, 0.9, 0.0]]])
    cells, labels, valid = select_cells(grid, num_points=3, t_pos=0.8, t_neg=0.2)
    assert cells[0].tolist() == [1, 0, 2] and labels[0].tolist() == [1, 1, 1] and valid.all()
    cells, labels, _ = select_cells(grid, num_points=5, t_pos=0.8, t_neg=0.2)
    assert cells[0].tolist() == [1, 0, 2, 4, 5] and labels[0].tolist() == [1, 1, 1, 1, 0]


def test_selection_rows_are_independent():
    a = torch.rand(1, 4, 6)
    b = torch.rand(1, 4, 6)
    both = select_cells(torch.cat([a, b]), 7, 0.8, 0.2)
    for k, g in enumerate((a, b)):
        alone = select_cells(g, 7, 0.8, 0.2)
        for x, y in zip(both, alone):
            assert torch.equal(x[k], y[0])


def test_padding_cells_never_chosen_and_fill_is_marked():
    grid = torch.full((1, 3, 5), -1.0)
    grid[0, :, 1:4] = torch.tensor([[0.0, 1.0, 0.5], [0.3, 0.9, 0.1], [0.6, 0.2, 0.85]])
    cells, labels, valid = select_cells(grid, num_points=12, t_pos=0.8, t_neg=0.2)
    assert valid[0].tolist() == [True] * 9 + [False] * 3
    chosen = cells[0, :9]
    assert (grid.flatten()[chosen] >= 0).all()
    assert chosen.tolist() == [2, 7, 13, 1, 8, 12, 3, 6, 11]
    assert labels[0].tolist() == [1, 1, 1, 0, 0, 0, -1, -1, -1] + [-1] * 3
    assert cells[0, 9:].tolist() == [0, 0, 0]


def test_coarse_grid_pads_portrait_and_landscape_with_minus_one():
    scores = torch.randn(2, 64)  # 8 x 8 tokens
    land = coarse_grid(scores, (40, 100), 2, "exact")  # 4 x 4 -> 4 x int(4*100/40)=10
    assert land.shape == (2, 4, 10)
    assert (land[:, :, :3] == -1).all() and (land[:, :, 7:] == -1).all() and (land[:, :, 3:7] >= 0).all()
    port = coarse_grid(scores, (90, 30), 1, "exact")  # 8 x 8 -> int(8*90/30)=24 x 8
    assert port.shape == (2, 24, 8)
    assert (port[:, :8] == -1).all() and (port[:, 16:] == -1).all()
    inner = port[:, 8:16]
    assert torch.allclose(inner, min_max(scores).view(2, 8, 8))  # down_sample 1: the map itself
    assert inner.amin((1, 2)).eq(0).all() and inner.amax((1, 2)).eq(1).all()
    square = coarse_grid(scores, (50, 50), 3, "exact")
    assert square.shape == (2, 2, 2) and (square >= 0).all()
    # even with every cell wanted, padding never comes out as a valid point
    for grid in (land, port):
        cells, _, valid = select_cells(grid, grid[0].numel(), 0.8, 0.2)
        assert (grid.flatten(1).gather(1, cells)[valid] >= 0).all()
        assert valid.sum(1).tolist() == [int((grid[0] >= 0).sum())] * 2


def test_crop_padding_undoes_clip_crop():
    from transformers.image_transforms import get_resize_output_image_size
    for h, w in [(480, 640), (640, 480), (37, 53), (301, 457), (100, 100), (1, 3), (999, 10)]:
        image = np.zeros((3, h, w), np.uint8)
        rh, rw = get_resize_output_image_size(image, 336, default_to_square=False, input_data_format="channels_first")
        top, bottom, left, right = crop_padding(336, h, w)
        assert (top + 336 + bottom, left + 336 + right) == (rh, rw)
        assert (top, left) == ((rh - 336) // 2, (rw - 336) // 2)  # where CLIP's centre crop starts


def test_end_to_end_points_on_a_hand_made_map_landscape_and_portrait():
    scores = torch.zeros(1, 64)
    scores[0, 2 * 8 + 5] = 10.0  # token (row 2, col 5): 1.0 after min-max
    scores[0, 6 * 8 + 1] = 9.0  # token (row 6, col 1): 0.9
    cfg = SasPConfig(num_points=4, t_pos=0.8, t_neg=0.2, down_sample=1, geometry="exact")
    seg = torch.ones(1, 1)
    image_hidden = scores[..., None]
    land = similarity_as_points(seg, image_hidden, (40, 80), (64, 128), cfg, TINY_CLIP)
    # grid 8 x 16 (4 columns of padding each side): cell (2, 5+4) -> x (9.5 * 80/16), y (2.5 * 40/8)
    # then the zero cells (all equal: raster order), the first being row 0, columns 4 and 5
    assert land.cells[0].tolist() == [[47, 12], [27, 32], [22, 2], [27, 2]]
    assert land.labels[0].tolist() == [1, 1, 0, 0]
    port = similarity_as_points(seg, image_hidden, (80, 40), (128, 64), cfg, TINY_CLIP)
    # grid 16 x 8 (4 rows of padding each side): cell (2+4, 5) -> x (5.5 * 40/8), y (6.5 * 80/16)
    assert port.cells[0].tolist() == [[27, 32], [7, 52], [2, 22], [7, 22]]
    # the refined points stay within half a pixel of the cell centres; SAM frame scales by 1.6
    for r in (land, port):
        assert (r.points - r.cells).abs().max() < 0.5
        torch.testing.assert_close(r.sam_points, r.points * 1.6)
    # the positive points sit on the full-resolution map's peaks
    full = land.full_map()[0]
    assert full[12, 47] > 0.9 and full[32, 27] > 0.8


@pytest.mark.parametrize("geometry", ["read", "exact"])
def test_cell_centres_stay_inside_tiny_images(geometry):
    for size in [(1, 3), (3, 1), (2, 2), (5, 400), (49, 49)]:
        scores = torch.randn(3, 64)
        grid = coarse_grid(scores, size, 2, geometry)
        cells, _, valid = select_cells(grid, 30, 0.8, 0.2)
        xy = cell_centres(cells, tuple(grid.shape[1:]), size, geometry)
        assert (xy >= 0).all() and (xy[..., 0] < size[1]).all() and (xy[..., 1] < size[0]).all()


# --- maps, refinement, coordinates --------------------------------------------------------------
@pytest.mark.parametrize("in_size,out_size", [(8, 112), (112, 37), (24, 336), (7, 3), (5, 5)])
def test_linear_resize_matrix_matches_interpolate(in_size, out_size):
    x = torch.randn(4, in_size)
    ref = F.interpolate(x[:, None], size=out_size, mode="linear", align_corners=False)[:, 0]
    torch.testing.assert_close(x @ linear_resize_matrix(in_size, out_size).float().T, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(37, 53), (64, 41), (20, 20), (1, 3), (300, 17)])
def test_full_map_equals_interpolate_pad_interpolate(size):
    scores = torch.randn(2, 64)
    m = F.interpolate(min_max(scores).view(2, 1, 8, 8), size=(TINY_CLIP, TINY_CLIP), mode="bilinear",
                      align_corners=False)
    top, bottom, left, right = crop_padding(TINY_CLIP, *size)
    m = F.interpolate(F.pad(m, (left, right, top, bottom)), size=size, mode="bilinear", align_corners=False)[:, 0]
    full = full_resolution_map(scores, size, TINY_CLIP, "exact")
    torch.testing.assert_close(full, m, atol=1e-4, rtol=0)  # torch.interpolate rounds its source index in float32
    assert full.min() >= 0 and full.max() <= 1


@pytest.mark.parametrize("size", [(37, 53), (64, 41), (9, 30), (1, 3)])
def test_windowed_refinement_equals_dense(size):
    torch.manual_seed(1)
    scores = torch.randn(2, 64) * 3
    factors = full_map_factors(scores, size, TINY_CLIP, "exact")
    h, w = size
    # corners, edges and interior points
    pts = torch.tensor([[0, 0], [w - 1, h - 1], [w // 2, h // 2], [0, h - 1], [w - 1, 0], [w // 3, min(2, h - 1)]])
    pts = pts[None].expand(2, -1, -1).contiguous()
    dense = refine_points_dense(pts, factors.dense())
    window = refine_points(pts, factors, size)
    torch.testing.assert_close(window, dense, atol=1e-4, rtol=0)
    assert (window - pts).abs().max() < 0.5
    # a steep map (values up to 8, steeper than any min-max map) is still exact with the default
    # window, while a 1-pixel window measurably is not: the comparison can fail
    steep = FullMapFactors(factors.rows, torch.rand_like(factors.grid) * 8, factors.cols)
    steep_dense = refine_points_dense(pts, steep.dense())
    torch.testing.assert_close(refine_points(pts, steep, size), steep_dense, atol=1e-4, rtol=0)
    if h > 4 and w > 4:
        assert not torch.allclose(refine_points(pts, steep, size, radius=1), steep_dense, atol=1e-3)


def test_refinement_is_differentiable_in_both_hidden_states():
    seg = torch.randn(2, 16, requires_grad=True)
    img = torch.randn(2, 64, 16, requires_grad=True)
    r = similarity_as_points(seg, img, (37, 53), (90, 128), SasPConfig(num_points=10), TINY_CLIP)
    (r.sam_points * torch.randn_like(r.sam_points)).sum().backward()
    assert seg.grad.abs().sum() > 0 and img.grad.abs().sum() > 0
    assert r.labels.dtype == torch.long and r.sam_points.dtype == torch.float32
    assert r.sam_points.shape == (2, 10, 2) and r.labels.shape == (2, 10)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (37, 53), (1, 3)])
def test_sam_frame_matches_resize_longest_side(size):
    from segment_anything.utils.transforms import ResizeLongestSide
    resized = ResizeLongestSide.get_preprocess_shape(size[0], size[1], 1024)
    pts = torch.rand(2, 5, 2) * torch.tensor([size[1] - 1, size[0] - 1])
    expected = ResizeLongestSide(1024).apply_coords_torch(pts, size)
    torch.testing.assert_close(to_sam_frame(pts, size, resized), expected)


def test_similarity_is_plain_dot_product():
    seg = torch.randn(3, 16)
    img = torch.randn(3, 64, 16)
    r = similarity_as_points(seg, img, (50, 50), (128, 128), SasPConfig(), TINY_CLIP)
    torch.testing.assert_close(r.scores, (img * seg[:, None]).sum(-1))


def test_bad_config_and_inputs_are_named():
    for bad, field in [(dict(num_points=0), "num_points"), (dict(down_sample=0), "down_sample"),
                       (dict(t_pos=0.2, t_neg=0.5), "t_neg"), (dict(t_pos=1.5), "t_pos")]:
        with pytest.raises(ValueError, match=field):
            validate_sasp_config(SasPConfig(**bad))
    with pytest.raises(ValueError, match="down_sample"):
        coarse_grid(torch.randn(1, 64), (10, 10), 9, "exact")
    with pytest.raises(ValueError, match="square grid"):
        similarity_as_points(torch.randn(1, 4), torch.randn(1, 60, 4), (10, 10), (128, 128), SasPConfig(), TINY_CLIP)
    with pytest.raises(ValueError, match="image_hidden"):
        similarity_as_points(torch.randn(1, 4), torch.randn(2, 64, 4), (10, 10), (128, 128), SasPConfig(), TINY_CLIP)


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    add_sasp_arguments(parser)
    assert sasp_config_from_args(parser.parse_args([])) is None
    assert sasp_config_from_args(parser.parse_args(["--use_sasp"])) == SasPConfig(30, 0.8, 0.2, 2)
    read13b = SasPConfig(num_points=10, down_sample=1)
    got = sasp_config_from_args(parser.parse_args(["--num_points", "60", "--t_pos", "0.6"]), read13b)
    assert got == SasPConfig(num_points=60, t_pos=0.6, t_neg=0.2, down_sample=1)
    with pytest.raises(ValueError, match="use_sasp"):
        sasp_config_from_args(parser.parse_args(["--num_points", "5"]))
    with pytest.raises(ValueError, match="t_neg"):
        sasp_config_from_args(parser.parse_args(["--use_sasp", "--t_neg", "0.9"]))


# --- the plug-in in SesameModel -------------------------------------------------------------------
def _teacher_forced_states(model, batch):
    """(hidden (B, L', H), spliced) from the LLM, as forward computes them."""
    from model.generation import positions_from_mask
    feats = model.encode_images_clip(batch.images_clip)
    rows = torch.repeat_interleave(torch.arange(len(batch.offset) - 1), batch.offset.diff())
    spliced = model.splice_image_features(batch.input_ids, batch.attention_mask, feats[rows], batch.labels)
    out = model.language_model.model(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
                                     position_ids=positions_from_mask(spliced.attention_mask))
    return out.last_hidden_state, spliced


def _force_segs(seg_steps, eos_step, seg_id, eos_id):
    def hook(step, logits):
        logits = logits.clone()
        if step in seg_steps:
            logits[:, seg_id] += 1e4
        elif step == eos_step:
            logits[:, eos_id] += 1e4
        else:  # keep the answer going, without further [SEG]s
            logits[:, seg_id] -= 1e4
            logits[:, eos_id] -= 1e4
        return logits
    return hook


def _masks(model, embedding, seg, resized, original, points=None):
    """Mask logits (n, H, W) of n [SEG] states on one image: decode_masks + SAM's postprocessing."""
    low_res = decode_masks(model.visual_model, embedding.expand(seg.shape[0], -1, -1, -1), model.project_seg(seg),
                           points)
    return masks_at_original_size(model.visual_model, low_res, resized, original)


def test_point_prompts_shape_dtype_device_and_plain_sesame_none(tokenizer, token_ids):
    cfg = SasPConfig(num_points=7)
    model = tiny_model(token_ids, len(tokenizer), sasp=cfg)
    hidden = model.config.llm.hidden_size
    seg, img = torch.randn(3, hidden), torch.randn(3, 64, hidden)
    coords, labels = model.sasp_points(seg, img, (96, 128), (30, 40)).sam_prompts()
    assert coords.shape == (3, 7, 2) and coords.dtype == torch.float32 and coords.device == model.device
    assert labels.shape == (3, 7) and labels.dtype == torch.long
    assert (coords[..., 0] <= 128).all() and (coords[..., 1] <= 96).all()
    embedding = model.encode_images_sam(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="image_hidden"):
        model.seg_masks(embedding, seg, [0, 0, 0], [(96, 128)], [(30, 40)], image_hidden=None)
    with torch.no_grad():
        (read,) = model.seg_masks(embedding, seg, [0, 0, 0], [(96, 128)], [(30, 40)], image_hidden=img)
    assert read.sasp is not None
    assert torch.equal(read.sasp.cells, model.sasp_points(seg, img, (96, 128), (30, 40)).cells)
    plain = tiny_model(token_ids, len(tokenizer))
    with torch.no_grad():
        (masks,) = plain.seg_masks(embedding, seg, [0, 0, 0], [(96, 128)], [(30, 40)], image_hidden=img)
    assert masks.sasp is None and masks.logits.shape == (3, 30, 40)


def test_sparse_prompt_is_points_then_pad_then_seg(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer), sasp=SasPConfig(num_points=5))
    sam = model.visual_model
    hidden = model.config.llm.hidden_size
    seg, img = torch.randn(2, hidden), torch.randn(2, 64, hidden)
    points = model.sasp_points(seg, img, (96, 128), (30, 40)).sam_prompts()
    seen = {}
    first = 1 + sam.mask_decoder.num_mask_tokens  # the transformer's tokens: IoU, masks, then the prompts
    sam.mask_decoder.transformer.register_forward_pre_hook(lambda m, args: seen.update(sparse=args[2][:, first:]))
    embedding = model.encode_images_sam(torch.zeros(1, 3, 128, 128))
    with torch.no_grad():
        decode_masks(sam, embedding.expand(2, -1, -1, -1), model.project_seg(seg), points)
        expected_points = sam.prompt_encoder._embed_points(points[0], points[1], pad=True)
    sparse = seen["sparse"]
    assert sparse.shape == (2, 5 + 2, model.config.out_dim)
    torch.testing.assert_close(sparse[:, :6], expected_points)  # 5 points, then SAM's pad point
    torch.testing.assert_close(sparse[:, 5], sam.prompt_encoder.not_a_point_embed.weight.expand(2, -1))
    with torch.no_grad():
        torch.testing.assert_close(sparse[:, 6], model.project_seg(seg))  # [SEG] last


def test_gradient_reaches_llm_through_the_points(tokenizer, token_ids):
    """With the [SEG] -> text_hidden_fcs path cut, only SasP's points connect the mask loss to the LLM."""
    grads = {}
    for name, sasp in (("read", SasPConfig(num_points=6, down_sample=1)), ("sesame", None)):
        model = tiny_model(token_ids, len(tokenizer), sasp=sasp)
        apply_lora(model)
        set_trainable(model)
        model.train()
        # B = 0 at init makes LoRA A's gradient 0; give B a value so both are tested
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        model.project_seg = lambda h, m=model: m.text_hidden_fcs[0](h.detach())
        batch = _batch(tokenizer, token_ids, model, [["Sure, it is [SEG]."], ["Yes [SEG]."]], [(37, 53), (64, 41)])
        out = model(batch)
        out.mask_loss.backward()
        lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        grads[name] = sum(float(g.abs().sum()) for g in lora.values() if g is not None)
        if name == "read":
            assert all(g is not None and g.abs().sum() > 0 for g in lora.values()), "every LoRA matrix gets gradient"
    assert grads["read"] > 0 and grads["sesame"] == 0


def test_two_segs_in_one_answer_forward(tokenizer, token_ids):
    cfg = SasPConfig(num_points=9, down_sample=1)
    model = tiny_model(token_ids, len(tokenizer), sasp=cfg, seed=2)
    batch = _batch(tokenizer, token_ids, model, [["A [SEG] and [SEG].", "No, there is no dog."], ["Yes [SEG]."]],
                   [(45, 30), (30, 60)])
    out = model(batch)
    assert [m.shape for m in out.pred_masks] == [(2, 45, 30), (1, 30, 60)]
    assert torch.isfinite(out.loss) and out.mask_bce_loss > 0
    # each [SEG] gets its own points, from its own state and its own conversation's image tokens
    hidden, spliced = _teacher_forced_states(model, batch)
    predicts_seg = spliced.token_ids[:, 1:] == token_ids.seg
    rows, cols = predicts_seg.nonzero(as_tuple=True)
    assert rows.tolist() == [0, 0, 2]
    starts = spliced.image_start[rows]
    image_hidden = torch.stack([hidden[r, s:s + 64] for r, s in zip(rows.tolist(), starts.tolist())])
    seg_hidden = hidden[rows, cols]
    both = similarity_as_points(seg_hidden[:2], image_hidden[:2], (45, 30), batch.resized_sizes[0], cfg, TINY_CLIP)
    for k in range(2):
        alone = similarity_as_points(seg_hidden[k:k + 1], image_hidden[k:k + 1], (45, 30), batch.resized_sizes[0],
                                     cfg, TINY_CLIP)
        assert torch.equal(both.cells[k], alone.cells[0]) and torch.equal(both.labels[k], alone.labels[0])
    assert not torch.equal(both.scores[0], both.scores[1])
    with torch.no_grad():
        emb = model.encode_images_sam(batch.images_sam[:1])
        expected = _masks(model, emb, seg_hidden[:2], batch.resized_sizes[0], (45, 30), both.sam_prompts())
    torch.testing.assert_close(out.pred_masks[0], expected, atol=1e-4, rtol=1e-4)


def test_two_segs_in_one_answer_predict_matches_teacher_forcing(tokenizer, token_ids):
    cfg = SasPConfig(num_points=8)
    model = tiny_model(token_ids, len(tokenizer), sasp=cfg, seed=4)
    images = [_image(50, 34, 5), _image(26, 70, 6)]
    clip, sam, resized, original = _inputs(model, images)
    prompts = [tokenize_with_image(build_prompt(q), tokenizer) for q in ("<image>\nthe left zebra and the car",
                                                                          "<image>\nIs there a dog?")]
    hook = _force_segs({0, 2}, 4, token_ids.seg, token_ids.eos)
    preds = model.predict(clip, sam, resized, original, prompts, [1, 0], max_new_tokens=8, logits_hook=hook)
    for k, (pred, i) in enumerate(zip(preds, [1, 0])):
        assert pred.output_ids.count(token_ids.seg) == 2
        assert pred.masks.shape == (2, *original[i])
        r = pred.sasp
        assert r is not None and r.points.shape == (2, 8, 2) and r.labels.shape == (2, 8)
        assert r.original_size == original[i] and not r.points.requires_grad
        # teacher forcing over prompt + answer gives the same states, hence the same points
        full = torch.tensor([prompts[k] + pred.output_ids])
        with torch.no_grad():
            hidden, spliced = _teacher_forced_states(model, SesameBatch(
                images_clip=clip[i:i + 1], images_sam=sam[i:i + 1], input_ids=full, labels=None,
                attention_mask=torch.ones_like(full), offset=torch.tensor([0, 1]), masks=[], resized_sizes=[],
                original_sizes=[]))
        cols = (spliced.token_ids[0, 1:] == token_ids.seg).nonzero()[:, 0]
        start = int(spliced.image_start[0])
        tf = similarity_as_points(hidden[0, cols], hidden[0, start:start + 64][None].expand(2, -1, -1), original[i],
                                  resized[i], cfg, TINY_CLIP)
        assert torch.equal(tf.cells, r.cells) and torch.equal(tf.labels, r.labels)
        torch.testing.assert_close(tf.points, r.points, atol=1e-3, rtol=0)
        # the masks are the ones these points give
        with torch.no_grad():
            emb = model.encode_images_sam(sam[i:i + 1])
            logits = _masks(model, emb, pred.seg_hidden, resized[i], original[i], (r.sam_points, r.labels))
        assert torch.equal(logits > 0, pred.masks)


def test_plain_sesame_is_unchanged(tokenizer, token_ids):
    plain = tiny_model(token_ids, len(tokenizer), seed=7)
    read = tiny_model(token_ids, len(tokenizer), seed=7, sasp=SasPConfig())
    batch = _batch(tokenizer, token_ids, plain, [["Yes [SEG]."]], [(40, 28)])
    out_plain, out_read = plain(batch), read(batch)
    hidden, spliced = _teacher_forced_states(plain, batch)
    seg = hidden[:, :-1][spliced.token_ids[:, 1:] == token_ids.seg]
    with torch.no_grad():
        emb = plain.encode_images_sam(batch.images_sam)
        text_only = _masks(plain, emb, seg, batch.resized_sizes[0], (40, 28))
    torch.testing.assert_close(out_plain.pred_masks[0], text_only, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_read.pred_masks[0], text_only, atol=1e-3)  # the points do change the mask
    torch.testing.assert_close(out_plain.ce_loss, out_read.ce_loss)  # same weights: SasP has no parameters
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in read.named_parameters()}
    clip, sam, resized, original = _inputs(plain, [_image(40, 28)])
    prompt = tokenize_with_image(build_prompt("<image>\nthe square"), tokenizer)
    pred = plain.predict(clip, sam, resized, original, [prompt], [0], max_new_tokens=3,
                         logits_hook=_force_segs({0}, 1, token_ids.seg, token_ids.eos))[0]
    assert pred.sasp is None and pred.masks.shape == (1, 40, 28)


def test_bf16_model_with_sasp(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer), sasp=SasPConfig(), dtype=torch.bfloat16)
    batch = _batch(tokenizer, token_ids, model, [["A [SEG] and [SEG]."]], [(33, 20)])
    out = model(batch.to("cpu", torch.bfloat16))
    assert torch.isfinite(out.loss) and out.pred_masks[0].shape == (2, 33, 20)
