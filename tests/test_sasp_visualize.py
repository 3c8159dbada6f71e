"""SasP pictures: JET heat map blend, point colours and positions, files per [SEG]."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import SasPConfig
from model.sasp import similarity_as_points
from utils.visualize_sasp import (
    LEGEND_HEIGHT,
    PANEL_GAP,
    POINT_COLOURS,
    display_scale,
    heatmap_overlay,
    render_sasp,
    save_sasp_pngs,
)

TINY_CLIP = 112


def _result(size, n=1):
    scores = torch.zeros(n, 64)
    scores[:, 2 * 8 + 5] = 10.0  # a peak at token (2, 5)
    scores[:, 6 * 8 + 1] = 9.0
    seg = torch.ones(n, 1)
    return similarity_as_points(seg, scores[..., None], size, size, SasPConfig(num_points=6, down_sample=1), TINY_CLIP)


def test_heatmap_is_jet_blended_point_three_image():
    image = np.full((2, 2, 3), 100, np.uint8)
    out = heatmap_overlay(image, np.array([[0.0, 1.0], [0.0, 1.0]]))
    # JET: 0 -> RGB (0, 0, 128), 1 -> (128, 0, 0); 0.3 * 100 + 0.7 * colour
    assert out[0, 0].tolist() == [30, 30, 120] and out[0, 1].tolist() == [120, 30, 30]
    with pytest.raises(ValueError, match="map shape"):
        heatmap_overlay(image, np.zeros((3, 2)))


def test_render_draws_points_in_their_colours_over_heat_map_and_mask():
    h, w = 40, 60
    image = np.full((h, w, 3), 100, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[5:15, 30:45] = True
    r = _result((h, w))
    pic = render_sasp(image, r, 0, mask)
    s = display_scale(h, w)
    assert s == 5 and pic.shape == (h * s + LEGEND_HEIGHT, 2 * w * s + PANEL_GAP, 3) and pic.dtype == np.uint8
    labels = r.labels[0].tolist()
    assert labels == [1, 1, 0, 0, 0, 0]
    for (x, y), label in zip(r.points[0].tolist(), labels):
        cx, cy = round((x + 0.5) * s - 0.5), round((y + 0.5) * s - 0.5)
        for offset in (0, w * s + PANEL_GAP):  # same point on both panels
            assert pic[cy, cx + offset].tolist() == list(POINT_COLOURS[label])
    # away from points: heat map red-ish at the peak's neighbourhood, blue in the crop padding
    peak = r.cells[0, 0].tolist()
    near = pic[peak[1] * s, (peak[0] + 2) * s]
    assert near[0] > near[2]
    far = pic[(h - 2) * s, 1 * s]  # bottom left: left of CLIP's crop, map 0
    assert far.tolist() == [30, 30, 120]
    inside = pic[14 * s, (44 * s) + w * s + PANEL_GAP]  # a mask pixel on the right panel
    assert inside.tolist() == [65, 122, 178]  # 0.5 * 100 + 0.5 * (30, 144, 255)
    outside = pic[(h - 2) * s, 2 * s + w * s + PANEL_GAP]
    assert outside.tolist() == [100, 100, 100]


@pytest.mark.parametrize("geometry", ["read", "exact"])
def test_heat_map_is_the_map_of_the_results_geometry(geometry):
    h, w = 49, 90  # READ's padding of the 112 map (46 + 46 columns) differs from the exact 46 + 47 here
    g = torch.Generator().manual_seed(0)
    seg, img = torch.randn(1, 8, generator=g), torch.randn(1, 64, 8, generator=g)
    r = similarity_as_points(seg, img, (h, w), (h, w), SasPConfig(num_points=6, geometry=geometry), TINY_CLIP)
    image = (np.random.default_rng(2).random((h, w, 3)) * 255).astype(np.uint8)
    pic = render_sasp(image, dataclasses.replace(r, valid=torch.zeros_like(r.valid)), 0)  # no points drawn
    s = display_scale(h, w)
    assert np.array_equal(pic[:h * s:s, :w * s:s], heatmap_overlay(image, r.full_map()[0].numpy()))
    other = dataclasses.replace(r, geometry="exact" if geometry == "read" else "read")
    assert not np.array_equal(heatmap_overlay(image, other.full_map()[0].numpy()), pic[:h * s:s, :w * s:s])


def test_save_one_png_per_seg_and_errors(tmp_path):
    h, w = 300, 120  # portrait, large enough for no enlargement
    image = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    r = _result((h, w), n=2)
    masks = np.zeros((2, h, w), bool)
    paths = save_sasp_pngs(str(tmp_path), image, r, masks)
    assert [p.split("/")[-1] for p in paths] == ["sasp.png", "sasp_1.png"]
    for k, p in enumerate(paths):
        saved = np.asarray(Image.open(p).convert("RGB"))
        assert np.array_equal(saved, render_sasp(image, r, k, masks[k]))
    with pytest.raises(ValueError, match="image is"):
        render_sasp(image[:-1], r, 0)
    with pytest.raises(ValueError, match="seg_index"):
        render_sasp(image, r, 2)
    with pytest.raises(ValueError, match="masks"):
        save_sasp_pngs(str(tmp_path), image, r, masks[:1])
    with pytest.raises(ValueError, match="directory"):
        save_sasp_pngs(str(tmp_path / "missing"), image, r)


def test_predict_output_can_be_visualised(tmp_path, tokenizer, token_ids):
    from model.conversation import build_prompt, tokenize_with_image
    from model.tiny import tiny_model
    from model.transforms import ClipTransform, SamTransform
    model = tiny_model(token_ids, len(tokenizer), sasp=SasPConfig(num_points=5))
    image = (np.random.default_rng(1).random((33, 47, 3)) * 255).astype(np.uint8)
    sam_in = SamTransform(model.config.sam.image_size)(image)
    clip = ClipTransform(model.config.vision.image_size)(image)

    def two_segs(step, logits):
        logits = logits.clone()
        logits[:, token_ids.seg if step in (0, 1) else token_ids.eos] += 1e4
        return logits
    prompt = tokenize_with_image(build_prompt("<image>\nthe square"), tokenizer)
    pred = model.predict(clip[None], sam_in.pixels[None], [sam_in.resized_size], [sam_in.original_size], [prompt], [0],
                         max_new_tokens=4, logits_hook=two_segs)[0]
    paths = save_sasp_pngs(str(tmp_path), image, pred.sasp, pred.masks.numpy())
    assert len(paths) == 2 and all(Image.open(p).size == (2 * 47 * 6 + PANEL_GAP, 33 * 6 + LEGEND_HEIGHT)
                                   for p in paths)
