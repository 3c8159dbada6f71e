"""SasP's two geometries: "read" (READ's own arithmetic, the default) against a literal reference
and hand-worked values; "exact" kept; the switch in config, flags and the model."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import SasPConfig, SesameConfig
from model.sasp import (
    FullMapFactors,
    add_sasp_arguments,
    coarse_grid,
    full_map_factors,
    full_resolution_map,
    read_padding,
    refine_points,
    refine_points_dense,
    sasp_config_from_args,
    similarity_as_points,
    uncrop_resize_matrix,
    validate_sasp_config,
)
from model.tiny import tiny_model

READ_CLIP = 336  # READ's full-resolution map side (its CLIP crop)
TINY_CLIP = 112  # tiny CLIP crop side: an 8 x 8 grid of image tokens
ISSUE_SIZES = [(201, 253), (321, 428), (427, 640), (640, 427)]


# --- an independent reference: READ's steps written out literally ----------------------------------
def read_pads(t: int, height: int, width: int) -> tuple[int, int]:
    """READ's (pad_h, pad_w): scale = t / min(H, W); pad = (int(side * scale) - t) // 2."""
    scale = t / min(height, width)
    return (int(height * scale) - t) // 2, (int(width * scale) - t) // 2


def short_side_crops(t: int, limit: int) -> list[int]:
    """Short sides S <= limit for which int(S * (t / S)) comes out below t: READ's pad is -1 there."""
    return [s for s in range(1, limit + 1) if int(s * (t / s)) < t]


def read_reference(seg, img, shape, down_sample, num_points, t_pos, t_neg, t):
    """READ's similarity_map_to_points for one [SEG] state (H,) and its image states (P, H), on dense
    maps, with ties in stable order. Returns (grid (h, w), [(x, y)] integer points, labels,
    refined (k, 2), full map (H, W))."""
    sm = (img * seg).sum(-1)  # element-wise product, then the sum, in the states' dtype
    side = math.isqrt(sm.numel())
    height, width = shape
    full = ((sm - sm.min()) / (sm.max() - sm.min())).view(1, 1, side, side).float()
    full = F.interpolate(full, size=(t, t), mode="bilinear", align_corners=False)
    pad_h, pad_w = read_pads(t, height, width)
    full = F.pad(full, (pad_w, pad_w, pad_h, pad_h))  # zeros; -1 crops
    full = F.interpolate(full, size=shape, mode="bilinear", align_corners=False)[0, 0]

    d = side // down_sample
    grid = F.interpolate(sm.float().view(1, 1, side, side), size=(d, d), mode="bilinear", align_corners=False)[0, 0]
    grid = (grid - grid.min()) / (grid.max() - grid.min())
    pad_h, pad_w = read_pads(d, height, width)
    grid = F.pad(grid, (pad_w, pad_w, pad_h, pad_h), value=-1.0)
    h, w = grid.shape

    values = grid.flatten().tolist()
    pos = sorted((i for i, v in enumerate(values) if v >= t_pos), key=lambda i: -values[i])
    neg = sorted((i for i, v in enumerate(values) if 0 <= v <= t_neg), key=lambda i: values[i])
    neutral = [i for i, v in enumerate(values) if t_neg < v < t_pos]
    chosen = (pos + neg + neutral)[:num_points]
    labels = [1 if i in pos else 0 if i in neg else -1 for i in chosen]
    points = []
    for i in chosen:  # one 0-dim tensor at a time: int % w + 0.5 is float32, times a Python float
        idx = torch.tensor(i)
        x = min((idx % w + 0.5) * (width / w), torch.tensor(width - 1.0))
        y = min((idx // w + 0.5) * (height / h), torch.tensor(height - 1.0))
        points.append((int(x.item()), int(y.item())))

    prob = torch.softmax(full.flatten(), 0).view(height, width)
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    refined = []
    for x, y in points:
        weight = torch.exp(-((xx - x) ** 2 + (yy - y) ** 2)) * prob
        weight = weight / weight.sum()
        refined.append(torch.stack([(weight * xx).sum(), (weight * yy).sum()]))
    return grid, points, labels, torch.stack(refined).reshape(-1, 2), full


def assert_matches_reference(r, seg, img, cfg, clip):
    for k in range(seg.shape[0]):
        grid, points, labels, refined, full = read_reference(seg[k], img[k], r.original_size, cfg.down_sample,
                                                             cfg.num_points, cfg.t_pos, cfg.t_neg, clip)
        assert torch.equal(r.grid[k], grid)
        m = len(points)
        assert r.valid[k].tolist() == [True] * m + [False] * (cfg.num_points - m)
        assert r.cells[k, :m].tolist() == [list(p) for p in points]
        assert r.labels[k, :m].tolist() == labels
        torch.testing.assert_close(r.points[k, :m], refined, atol=1e-4, rtol=1e-6)  # a 13x13 window vs all pixels
        # F.interpolate computes its source positions in float32, the factors in float64
        torch.testing.assert_close(r.full_map()[k], full, atol=1e-4, rtol=0)


def _states(n, p, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g).to(dtype), torch.randn(n, p, width, generator=g).to(dtype))


# --- padding, by hand --------------------------------------------------------------------------------
def test_read_padding_by_hand():
    # 201x253, t=12: 253 * 12/201 = 15.10 -> 15, (15 - 12) // 2 = 1 both sides (exact: 1 and 2)
    assert read_padding(12, 201, 253) == (0, 0, 1, 1)
    # 321x428: 321 * (12/321) is 10.999... in floats -> 11: pad -1 (a crop); 428 * 12/321 = 16 exactly,
    # 15.999... in floats -> 15: pad 1 (exact: 2 and 2); at t = 336: 335 -> -1, 447 -> 55
    assert read_padding(12, 321, 428) == (-1, -1, 1, 1)
    assert read_padding(24, 321, 428) == (-1, -1, 3, 3)
    assert read_padding(336, 321, 428) == (-1, -1, 55, 55)
    # 427x640: 640 * 12/427 = 17.99 -> 17: pad 2 (exact 2 and 3); 640 * 336/427 = 503.6 -> 83 (exact 83, 84)
    assert read_padding(12, 427, 640) == (0, 0, 2, 2) and read_padding(336, 427, 640) == (0, 0, 83, 83)
    assert read_padding(12, 640, 427) == (2, 2, 0, 0) and read_padding(336, 640, 427) == (83, 83, 0, 0)
    assert read_padding(12, 200, 200) == (0, 0, 0, 0)
    for t, hand in [(12, [47, 94, 147]), (336, [79, 158, 165]), (8, [49, 98, 103]), (112, [55, 71, 83])]:
        assert short_side_crops(t, hand[-1]) == hand
        for s in hand:
            assert read_padding(t, s, 2 * s)[:2] == (-1, -1) and read_padding(t, 2 * s, s)[2:] == (-1, -1)
    with pytest.raises(ValueError, match="original_size"):
        read_padding(12, 0, 5)


def test_crop_sizes_exist_for_every_grid_side_used_here():
    # the -1 crop is not a corner case: for each side READ and the tiny model use, search finds some
    for t in (4, 8, 12, 24, 112, 336):
        crops = short_side_crops(t, 700)
        assert len(crops) >= 10, t
    assert 321 in short_side_crops(12, 400) and 321 in short_side_crops(336, 400)


# --- hand-made maps at READ's scale: grid shape, padding, cells, points ------------------------------
def _two_peaks_576():
    """576 scores (24 x 24): a 10 on the 2x2 token block that down-samples to coarse cell (5, 6), a 9
    on the block of cell (0, 3), 0 elsewhere; down_sample 2 gives exactly 1.0, 0.9 and 0 there."""
    scores = torch.zeros(24, 24)
    scores[10:12, 12:14] = 10.0
    scores[0:2, 6:8] = 9.0
    return scores.view(1, 576, 1)


def test_crop_case_321x428_by_hand():
    img, seg = _two_peaks_576(), torch.ones(1, 1)
    read = similarity_as_points(seg, img, (321, 428), (768, 1024), SasPConfig(num_points=3), READ_CLIP)
    # 12 x 12 grid, row pads -1 (crop rows 0 and 11), column pads 1 -> 10 x 14
    assert read.grid.shape == (1, 10, 14)
    assert (read.grid[0, :, 0] == -1).all() and (read.grid[0, :, 13] == -1).all() and (read.grid[0, :, 1:13] >= 0).all()
    assert read.grid[0, 4, 7] == 1.0 and not (read.grid == 0.9).any()  # the 0.9 cell was in the cropped row 0
    # cells: the peak (4, 7) = 63, then the zero cells in raster order 1, 2 (0 is padding)
    # x = int((col + 0.5) * 428/14), y = int((row + 0.5) * 321/10)
    assert read.cells[0].tolist() == [[229, 144], [45, 16], [76, 16]]  # 229.29, 144.45 | 45.86, 16.05 | 76.43
    assert read.labels[0].tolist() == [1, 0, 0]
    exact = similarity_as_points(seg, img, (321, 428), (768, 1024), SasPConfig(num_points=3, geometry="exact"),
                                 READ_CLIP)
    # exact: pads 2 and 2 columns -> 12 x 16; peak (5, 8), 0.9 at (0, 5), first zero (0, 2); scale 26.75
    assert exact.grid.shape == (1, 12, 16)
    assert exact.cells[0].tolist() == [[227, 147], [147, 13], [66, 13]]
    assert exact.labels[0].tolist() == [1, 1, 0]
    assert_matches_reference(read, seg, img, SasPConfig(num_points=3), READ_CLIP)


@pytest.mark.parametrize("size,grid_shape,exact_shape,pads", [
    ((201, 253), (12, 14), (12, 15), (0, 1)),
    ((427, 640), (12, 16), (12, 17), (0, 2)),
    ((640, 427), (16, 12), (17, 12), (2, 0)),
    ((321, 428), (10, 14), (12, 16), (-1, 1)),
])
def test_grid_shape_and_padding_for_the_issue_sizes(size, grid_shape, exact_shape, pads):
    seg, img = _states(2, 576, 8, torch.float32, seed=3)
    read = similarity_as_points(seg, img, size, (512, 512), SasPConfig(), READ_CLIP)
    exact = similarity_as_points(seg, img, size, (512, 512), SasPConfig(geometry="exact"), READ_CLIP)
    assert read.grid.shape == (2, *grid_shape) and exact.grid.shape == (2, *exact_shape)
    pad_h, pad_w = pads
    inner = read.grid[:, max(pad_h, 0):grid_shape[0] - max(pad_h, 0), max(pad_w, 0):grid_shape[1] - max(pad_w, 0)]
    assert (inner >= 0).all() and (read.grid == -1).sum() == 2 * (read.grid[0].numel() - inner[0].numel())
    # the kept block is the min-max 12 x 12 grid, with one row / column cut from each side where the pad is -1
    small = F.interpolate(read.scores.float().view(2, 1, 24, 24), size=(12, 12), mode="bilinear",
                          align_corners=False)[:, 0]
    small = (small - small.amin((1, 2), keepdim=True)) / (small.amax((1, 2), keepdim=True)
                                                           - small.amin((1, 2), keepdim=True))
    cut_h, cut_w = max(-pad_h, 0), max(-pad_w, 0)
    assert torch.equal(inner, small[:, cut_h:12 - cut_h, cut_w:12 - cut_w])


def test_square_with_integer_cell_centres_by_hand():
    # 200 x 200, 12 x 12 grid: cell (7, 7) has its centre at 7.5 * 200/12 = 125 exactly. READ's
    # float32 gives 7.5 * fl32(16.666...) = 124.999992 -> 124; float64 gives 125.
    scores = torch.zeros(24, 24)
    scores[14:16, 14:16] = 1.0
    img, seg = scores.view(1, 576, 1), torch.ones(1, 1)
    read = similarity_as_points(seg, img, (200, 200), (1024, 1024), SasPConfig(num_points=2), READ_CLIP)
    exact = similarity_as_points(seg, img, (200, 200), (1024, 1024), SasPConfig(num_points=2, geometry="exact"),
                                 READ_CLIP)
    assert read.grid.shape == exact.grid.shape == (1, 12, 12)
    assert read.cells[0, 0].tolist() == [124, 124] and exact.cells[0, 0].tolist() == [125, 125]
    assert read.cells[0, 1].tolist() == [8, 8] and exact.cells[0, 1].tolist() == [8, 8]  # 0.5 * 16.67, both
    assert_matches_reference(read, seg, img, SasPConfig(num_points=2), READ_CLIP)


# --- random states against the literal reference ------------------------------------------------------
@pytest.mark.parametrize("size", ISSUE_SIZES + [(200, 200), (400, 400)])
@pytest.mark.parametrize("down_sample", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_geometry_equals_reference(size, down_sample, dtype):
    cfg = SasPConfig(down_sample=down_sample)
    seg, img = _states(2, 576, 32, dtype, seed=size[0] + down_sample)
    r = similarity_as_points(seg, img, size, (512, 512), cfg, READ_CLIP)
    assert r.scores.dtype == dtype and r.grid.dtype == torch.float32 and r.points.dtype == torch.float32
    assert_matches_reference(r, seg, img, cfg, READ_CLIP)


@pytest.mark.parametrize("size", [(49, 70), (70, 49), (55, 90), (107, 107), (98, 103)])
@pytest.mark.parametrize("down_sample", [1, 2])
def test_read_geometry_equals_reference_in_crop_cases(size, down_sample):
    # tiny model's scales: coarse sides 8 and 4 crop at short side 49, 98, 103, 107; the 112 map at 55, 107
    cfg = SasPConfig(num_points=12, down_sample=down_sample)
    seg, img = _states(3, 64, 16, torch.float32, seed=sum(size))
    r = similarity_as_points(seg, img, size, (128, 128), cfg, TINY_CLIP)
    side = 8 // down_sample
    pad_h, pad_w = read_pads(side, *size)
    assert r.grid.shape == (3, side + 2 * pad_h, side + 2 * pad_w)
    assert_matches_reference(r, seg, img, cfg, TINY_CLIP)


def test_bf16_scores_stay_bf16_and_ties_keep_raster_order():
    seg, img = _states(2, 576, 64, torch.bfloat16, seed=11)
    cfg = SasPConfig(num_points=200, t_pos=0.6, t_neg=0.4, down_sample=1)
    r = similarity_as_points(seg, img, (427, 640), (683, 1024), cfg, READ_CLIP)
    assert r.scores.dtype == torch.bfloat16 and torch.equal(r.scores, (img * seg[:, None]).sum(-1))
    # bf16 scores tie among the positive and the negative cells; the reference orders ties stably
    for k in range(2):
        values = r.grid[k].flatten()
        for chosen in (values[values >= 0.6], values[(values >= 0) & (values <= 0.4)]):
            assert chosen.unique().numel() < chosen.numel()
    assert_matches_reference(r, seg, img, cfg, READ_CLIP)
    # "exact" scores the same states in float32: no longer the bf16 values
    exact = similarity_as_points(seg, img, (427, 640), (683, 1024), SasPConfig(geometry="exact"), READ_CLIP)
    assert exact.scores.dtype == torch.float32 and not torch.equal(exact.scores, r.scores.float())


def test_a_grid_cropped_to_nothing_is_an_error():
    # down_sample 4 leaves 2 x 2 cells; at a short side of 49, READ's pad is -1: nothing is left
    assert read_pads(2, 49, 80)[0] == -1
    with pytest.raises(ValueError, match="down_sample=4"):
        coarse_grid(torch.randn(1, 64), (49, 80), 4, "read")
    assert coarse_grid(torch.randn(1, 64), (49, 80), 4, "exact").shape == (1, 2, 3)


# --- refinement: windowed = dense, differentiable ------------------------------------------------------
@pytest.mark.parametrize("before,after", [(-1, -1), (-1, 3), (2, -1), (0, 0), (5, 4), (-3, -2)])
def test_uncrop_resize_matrix_with_negative_pads(before, after):
    x = torch.randn(3, 8, dtype=torch.float64)
    ref = F.interpolate(x[:, None], size=112, mode="linear", align_corners=False)
    ref = F.interpolate(F.pad(ref, (before, after)), size=37, mode="linear", align_corners=False)[:, 0]
    torch.testing.assert_close(x.float() @ uncrop_resize_matrix(8, 112, before, after, 37).T, ref.float(),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(55, 90), (90, 55), (107, 107), (49, 70), (37, 53), (1, 3)])
def test_windowed_refinement_equals_dense_in_read_geometry(size):
    torch.manual_seed(2)
    scores = torch.randn(2, 64) * 3
    factors = full_map_factors(scores, size, TINY_CLIP, "read")
    h, w = size
    # the factors are READ's dense steps (a -1 pad crops the resized map before the last resize)
    pad_h, pad_w = read_pads(TINY_CLIP, h, w)
    m = F.interpolate(((scores - scores.amin(1, keepdim=True)) / (scores.amax(1, keepdim=True)
                                                                  - scores.amin(1, keepdim=True))).view(2, 1, 8, 8),
                      size=(TINY_CLIP, TINY_CLIP), mode="bilinear", align_corners=False)
    m = F.interpolate(F.pad(m, (pad_w, pad_w, pad_h, pad_h)), size=size, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(factors.dense(), m, atol=1e-4, rtol=0)
    pts = torch.tensor([[0, 0], [w - 1, h - 1], [w // 2, h // 2], [0, h - 1], [w - 1, 0], [w // 3, min(2, h - 1)]])
    pts = pts[None].expand(2, -1, -1).contiguous()
    torch.testing.assert_close(refine_points(pts, factors, size), refine_points_dense(pts, m), atol=1e-4, rtol=0)
    steep = FullMapFactors(factors.rows, torch.rand_like(factors.grid) * 8, factors.cols)
    torch.testing.assert_close(refine_points(pts, steep, size), refine_points_dense(pts, steep.dense()),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size,clip,p", [((55, 90), TINY_CLIP, 64), ((107, 107), TINY_CLIP, 64),
                                          ((321, 428), READ_CLIP, 576)])
def test_read_points_are_differentiable(dtype, size, clip, p):
    seg = torch.randn(2, 16).to(dtype).requires_grad_()
    img = torch.randn(2, p, 16).to(dtype).requires_grad_()
    r = similarity_as_points(seg, img, size, (128, 128), SasPConfig(num_points=10), clip)
    assert r.sam_points.dtype == torch.float32
    (r.sam_points * torch.randn_like(r.sam_points)).sum().backward()
    assert seg.grad.abs().sum() > 0 and img.grad.abs().sum() > 0


# --- the switch: config, flags, checkpoints, model ---------------------------------------------------
def test_geometry_field_is_validated_and_round_trips():
    assert SasPConfig().geometry == "read"
    with pytest.raises(ValueError, match="sasp.geometry"):
        validate_sasp_config(SasPConfig(geometry="READ"))
    with pytest.raises(ValueError, match="sasp.geometry"):
        similarity_as_points(torch.randn(1, 4), torch.randn(1, 64, 4), (10, 10), (128, 128),
                             SasPConfig(geometry="round"), TINY_CLIP)
    cfg = SesameConfig.tiny(100, sasp=SasPConfig(num_points=7, geometry="exact"))
    assert SesameConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    del old["sasp"]["geometry"]  # a SasP dict saved before the switch existed
    assert SesameConfig.from_dict(old).sasp == SasPConfig(num_points=7, geometry="read")


def test_geometry_flag():
    parser = argparse.ArgumentParser()
    add_sasp_arguments(parser)
    assert sasp_config_from_args(parser.parse_args(["--use_sasp"])).geometry == "read"
    got = sasp_config_from_args(parser.parse_args(["--sasp_geometry", "exact"]), SasPConfig(num_points=10))
    assert got == SasPConfig(num_points=10, geometry="exact")
    back = sasp_config_from_args(parser.parse_args(["--sasp_geometry", "read"]), got)
    assert back == SasPConfig(num_points=10, geometry="read")
    assert sasp_config_from_args(parser.parse_args([]), got) == got  # unset: the checkpoint's
    with pytest.raises(ValueError, match="--sasp_geometry"):
        sasp_config_from_args(parser.parse_args(["--sasp_geometry", "exact"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--sasp_geometry", "round"])


def test_model_follows_the_switch(tokenizer, token_ids):
    seg, img = _states(2, 64, 64, torch.float32, seed=5)
    size, resized = (49, 90), (70, 128)  # READ crops the 4 x 4 grid's rows here, pads the 112 map's columns 46 + 46
    results = {}
    for geometry in ("read", "exact"):
        cfg = SasPConfig(num_points=6, geometry=geometry)
        model = tiny_model(token_ids, len(tokenizer), sasp=cfg)
        r = model.sasp_points(seg, img, resized, size)
        direct = similarity_as_points(seg, img, size, resized, cfg, TINY_CLIP)
        assert r.geometry == geometry and torch.equal(r.cells, direct.cells)
        coords, labels = r.sam_prompts()
        assert torch.equal(coords, direct.sam_points) and torch.equal(labels, direct.labels)
        results[geometry] = r
    assert not torch.equal(results["read"].full_map(), results["exact"].full_map())
    assert results["read"].grid.shape != results["exact"].grid.shape
    torch.testing.assert_close(results["exact"].full_map(),
                               full_resolution_map(results["exact"].scores, size, TINY_CLIP, "exact"))
