"""READ's Similarity-as-Points (SasP): SAM point prompts picked from what the [SEG] state attends to.

Per [SEG] (any number per answer; each is handled on its own):

  seg_hidden (H,) . image_hidden (P, H)        plain dot product, final-norm LLM states, P = g x g
    -> coarse grid: g x g -> bilinear (g // down_sample)^2 -> min-max -> pad with -1 to the image
       aspect ratio (undoing CLIP's shortest-side resize + centre crop)
    -> cells >= t_pos (highest first), then 0 <= cells <= t_neg (lowest first), then the rest in
       raster order; the first `num_points`, labels 1 / 0 / -1; padding cells are never chosen
    -> integer cell centres in original-image pixels
    -> Discrete-to-Continuous refinement on the full-resolution map (min-max, g x g -> crop size,
       zero-pad to the aspect ratio, -> (H, W)): a Gaussian (exp(-d^2)) x softmax(map) weighted mean
       of pixel coordinates around each point, which makes the points differentiable in the map
    -> SAM's input frame (ResizeLongestSide scale); SAM adds +0.5 and a pad point itself, and
       `sam.decode_masks` puts the [SEG] embedding after the points.

Two geometries (`SasPConfig.geometry`):
  "read"   (default) as READ's code computes, which READ's weights were trained with. A t x t
           map is padded by (int(L * (t / min(H, W))) - t) // 2 in Python floats at both ends of
           the axis of image length L, for the coarse grid (t = its side) and the full-resolution
           map (t = the CLIP crop side; READ hard-codes 336, its CLIP's). Where the extra length
           is odd that is one short of the image's aspect ratio, and where float rounding puts
           int(...) one below t (short side) it is -1: one row or column cropped at each end.
           Cell centres in float32; the dot product and the full map's min-max in the hidden
           states' dtype (bf16 in READ's runs; products rounded before the sum, as READ's are).
  "exact"  undoes CLIP's crop exactly (its extra // 2 and extra - extra // 2 split), cell centres
           in float64, scores in float32.
Ties between equal cell values keep raster order in both (READ's sort is unstable: no order).

SasP has no parameters and no loss; the mask loss reaches the LLM through the refined points.

Where a [SEG] has fewer usable cells than `num_points` (tiny grids, extreme aspect ratios), the list
is filled with label -1 points at (0, 0) marked `valid = False`, so every [SEG] of a batch has
exactly `num_points` prompts. SAM treats label -1 as "not a point" (positional encoding zeroed),
which is also what READ's neutral cells are.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import SasPConfig

# Refinement window half-width in pixels. The kernel is exp(-d^2) and the min-max map is in [0, 1],
# so a pixel's softmax weight is at most e times another's: pixels beyond 6 px carry a relative
# weight below e * exp(-49) ~ 1e-21, which is zero in float32 and float64 alike.
REFINE_RADIUS = 6

LABEL_POSITIVE, LABEL_NEGATIVE, LABEL_NEUTRAL = 1, 0, -1
GEOMETRIES = ("read", "exact")


def validate_sasp_config(cfg: SasPConfig) -> None:
    """Raise a ValueError naming the SasPConfig field that is out of range."""
    if int(cfg.num_points) < 1:
        raise ValueError(f"sasp.num_points must be >= 1, got {cfg.num_points}")
    if int(cfg.down_sample) < 1:
        raise ValueError(f"sasp.down_sample must be >= 1, got {cfg.down_sample}")
    if not 0.0 <= cfg.t_neg < cfg.t_pos <= 1.0:
        raise ValueError(f"sasp thresholds need 0 <= t_neg < t_pos <= 1 (the map is min-max normalised), "
                         f"got t_neg={cfg.t_neg}, t_pos={cfg.t_pos}")
    if cfg.geometry not in GEOMETRIES:
        raise ValueError(f"sasp.geometry must be one of {GEOMETRIES}, got {cfg.geometry!r}")


# --- geometry -----------------------------------------------------------------------------------
def crop_padding(crop: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that turns a `crop` x `crop` centre crop back into the
    aspect ratio of the whole image, at the crop's scale.

    Mirrors CLIP's preprocessing: the short side goes to `crop`, the long side to
    int(crop * long / short), and the crop starts at (long_new - crop) // 2.
    """
    _check_size(height, width)
    short, long = min(height, width), max(height, width)
    extra = int(crop * long / short) - crop
    before, after = extra // 2, extra - extra // 2
    return (0, 0, before, after) if height <= width else (before, after, 0, 0)


def read_padding(side: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of a `side` x `side` map as READ computes it: the same
    amount on both ends of an axis, (int(length * side / min(H, W)) - side) // 2 in Python floats.
    A pad of -1 (int(...) one below `side` by float rounding) crops one row or column each end."""
    _check_size(height, width)
    scale = side / min(height, width)
    pad_h = (int(height * scale) - side) // 2
    pad_w = (int(width * scale) - side) // 2
    return pad_h, pad_h, pad_w, pad_w


def aspect_padding(side: int, original_size: tuple[int, int], geometry: str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) that brings a `side` x `side` map to the image's aspect ratio."""
    return (read_padding if geometry == "read" else crop_padding)(side, *original_size)


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"original_size must be positive, got {(height, width)}")


def linear_resize_matrix(in_size: int, out_size: int, keep_from: int = 0, keep: Optional[int] = None,
                         device=None) -> torch.Tensor:
    """(out_size, keep) weights of 1-D linear resizing as `F.interpolate(..., align_corners=False)`
    computes it, restricted to input positions keep_from .. keep_from + keep - 1 (columns for
    positions outside 0 .. in_size - 1 stay zero).

    Dropping input positions is how zero padding is applied without building the padded signal.
    """
    keep = in_size - keep_from if keep is None else keep
    dst = torch.arange(out_size, dtype=torch.float64, device=device)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = src - i0
    weights = torch.zeros(out_size, keep, dtype=torch.float64, device=device)
    rows = torch.arange(out_size, device=device)
    for idx, w in ((i0, 1.0 - w1), (i1, w1)):
        col = idx - keep_from
        inside = (col >= 0) & (col < keep)
        weights.index_put_((rows[inside], col[inside]), w[inside], accumulate=True)
    return weights


def uncrop_resize_matrix(grid: int, crop: int, pad_before: int, pad_after: int, out_size: int,
                         device=None) -> torch.Tensor:
    """(out_size, grid) weights along one axis of: grid -> bilinear to crop -> zero-pad by
    (pad_before, pad_after) -> bilinear to out_size.

    A negative pad crops, as `F.pad` does, with no special case: crop position c sits at padded
    position c + pad_before, so keep_from = pad_before < 0 and the crop positions outside the
    padded signal are simply never read by the second resize.
    """
    to_crop = linear_resize_matrix(grid, crop, device=device)
    to_out = linear_resize_matrix(pad_before + crop + pad_after, out_size, keep_from=pad_before, keep=crop,
                                  device=device)
    return (to_out @ to_crop).float()


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation of (n, ...) to [0, 1]; a constant row becomes all zeros."""
    flat = x.flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=1e-12)).view_as(x)


def grid_side(num_patches: int) -> int:
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"image_hidden must hold a square grid of image tokens, got P={num_patches}")
    return g


# --- similarity maps ----------------------------------------------------------------------------
def similarity_scores(seg_hidden: torch.Tensor, image_hidden: torch.Tensor, geometry: str) -> torch.Tensor:
    """(n, H) [SEG] states . (n, P, H) image-token states -> (n, P) raw dot products: in float32
    for "exact"; for "read" in the states' dtype, each product rounded before the sum as READ's
    element-wise product and sum do."""
    if seg_hidden.dim() != 2 or image_hidden.dim() != 3 or image_hidden.shape[0] != seg_hidden.shape[0] \
            or image_hidden.shape[2] != seg_hidden.shape[1]:
        raise ValueError(f"expected seg_hidden (n, H) and image_hidden (n, P, H); got {tuple(seg_hidden.shape)} "
                         f"and {tuple(image_hidden.shape)}")
    if geometry == "read":
        return (image_hidden * seg_hidden.to(image_hidden.dtype)[:, None]).sum(-1)
    return torch.einsum("nph,nh->np", image_hidden.float(), seg_hidden.float())


def coarse_grid(scores: torch.Tensor, original_size: tuple[int, int], down_sample: int, geometry: str) -> torch.Tensor:
    """(n, P) raw scores -> (n, h, w) float32: down-sampled, min-max normalised, padded with -1 to
    the image's aspect ratio. Padding cells are < 0, so no threshold ever selects them."""
    n, g = scores.shape[0], grid_side(scores.shape[1])
    side = g // down_sample
    if side < 1:
        raise ValueError(f"sasp.down_sample={down_sample} leaves no cells of the {g}x{g} similarity grid")
    top, bottom, left, right = aspect_padding(side, original_size, geometry)
    if min(side + top + bottom, side + left + right) < 1:  # READ's -1 pads crop a 1- or 2-cell side away
        raise ValueError(f"sasp.down_sample={down_sample} leaves a {side}x{side} grid, which READ's aspect "
                         f"padding crops to nothing for an image of {original_size[0]}x{original_size[1]}")
    small = F.interpolate(scores.float().view(n, 1, g, g), size=(side, side), mode="bilinear", align_corners=False)
    return F.pad(min_max(small[:, 0]), (left, right, top, bottom), value=-1.0)


@dataclass
class FullMapFactors:
    """The full-resolution map as rows @ grid @ cols.T, so (H, W) maps need not be materialised.

    rows: (H, g), cols: (W, g) linear operators (resize to the crop, zero-pad, resize to the
    image); grid: (n, g, g) min-max normalised scores.
    """

    rows: torch.Tensor
    grid: torch.Tensor
    cols: torch.Tensor

    def dense(self) -> torch.Tensor:
        """(n, H, W) map in [0, 1]."""
        return self.rows @ self.grid @ self.cols.T

    def at(self, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Map values on per-point pixel windows: ys (n, K, a), xs (n, K, b) -> (n, K, a, b)."""
        return torch.einsum("nkag,ngh,nkbh->nkab", self.rows[ys], self.grid, self.cols[xs])


def full_map_factors(scores: torch.Tensor, original_size: tuple[int, int], clip_size: int,
                     geometry: str) -> FullMapFactors:
    """Factors of the full-resolution map of (n, P) raw scores. The min-max runs in the scores'
    dtype (READ's order: normalise, then go to float32 for the resizing)."""
    n, g = scores.shape[0], grid_side(scores.shape[1])
    height, width = original_size
    top, bottom, left, right = aspect_padding(clip_size, original_size, geometry)
    device = scores.device
    return FullMapFactors(rows=uncrop_resize_matrix(g, clip_size, top, bottom, height, device=device),
                          grid=min_max(scores).float().view(n, g, g),
                          cols=uncrop_resize_matrix(g, clip_size, left, right, width, device=device))


def full_resolution_map(scores: torch.Tensor, original_size: tuple[int, int], clip_size: int,
                        geometry: str) -> torch.Tensor:
    """(n, P) raw scores -> (n, H, W) float32 map over the original image (zero where CLIP's crop cut)."""
    return full_map_factors(scores, original_size, clip_size, geometry).dense()


# --- points -------------------------------------------------------------------------------------
def select_cells(grid: torch.Tensor, num_points: int, t_pos: float, t_neg: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick `num_points` cells of each (h, w) grid in priority order.

    Returns flat cell indices (n, K), labels (n, K) (1 positive, 0 negative, -1 neutral or fill)
    and valid (n, K) (False for fill entries, which exist only when fewer cells can be chosen).
    """
    values = grid.flatten(1)
    positive = values >= t_pos
    negative = (values >= 0) & (values <= t_neg) & ~positive
    neutral = (values > t_neg) & (values < t_pos)
    # class rank (0 pos, 1 neg, 2 neutral, 3 never) first, then value, then raster order:
    # two stable sorts give that lexicographic order without mixing floats into one key.
    rank = torch.full_like(values, 3, dtype=torch.long)
    rank[neutral], rank[negative], rank[positive] = 2, 1, 0
    within = torch.where(positive, -values, torch.where(negative, values, torch.zeros_like(values)))
    order = torch.argsort(within, dim=1, stable=True)
    order = order.gather(1, torch.argsort(rank.gather(1, order), dim=1, stable=True))
    k = min(num_points, values.shape[1])
    cells = order[:, :k]
    chosen_rank = rank.gather(1, cells)
    label_of_rank = torch.tensor([LABEL_POSITIVE, LABEL_NEGATIVE, LABEL_NEUTRAL, LABEL_NEUTRAL], device=grid.device)
    labels, valid = label_of_rank[chosen_rank], chosen_rank < 3
    if k < num_points:
        fill = num_points - k
        cells = F.pad(cells, (0, fill))
        labels = F.pad(labels, (0, fill), value=LABEL_NEUTRAL)
        valid = F.pad(valid, (0, fill), value=False)
    cells = torch.where(valid, cells, torch.zeros_like(cells))
    return cells, labels, valid


def cell_centres(cells: torch.Tensor, grid_shape: tuple[int, int], original_size: tuple[int, int],
                 geometry: str) -> torch.Tensor:
    """Flat cell indices (n, K) of an (h, w) grid -> integer (x, y) pixel centres (n, K, 2) in the
    original image, clamped inside it: (index + 0.5) * side / cells, truncated. "read" computes it
    in float32 (with the scale rounded to float32, as a tensor times a Python float is), "exact" in
    float64; where the exact value is an integer, float32 can land one pixel either side of it."""
    h, w = grid_shape
    height, width = original_size
    dtype = torch.float32 if geometry == "read" else torch.float64
    x = ((cells % w).to(dtype) + 0.5) * torch.tensor(width / w, dtype=dtype)
    y = ((cells // w).to(dtype) + 0.5) * torch.tensor(height / h, dtype=dtype)
    return torch.stack([x.clamp(max=width - 1).long(), y.clamp(max=height - 1).long()], dim=-1)


def refine_points(points: torch.Tensor, full_map: FullMapFactors, original_size: tuple[int, int],
                  radius: int = REFINE_RADIUS) -> torch.Tensor:
    """Discrete-to-Continuous: integer (n, K, 2) xy -> float (n, K, 2) weighted means of the pixel
    coordinates, weights exp(-squared distance) x softmax(full-resolution map).

    Computed on a (2 radius + 1)^2 window per point; the softmax normaliser over all H*W pixels
    cancels when the weights are normalised, so only the window's map values are needed.
    """
    height, width = original_size
    offsets = torch.arange(-radius, radius + 1, device=points.device)
    xs = points[..., 0:1] + offsets  # (n, K, b)
    ys = points[..., 1:2] + offsets  # (n, K, a)
    inside = ((ys >= 0) & (ys < height))[..., :, None] & ((xs >= 0) & (xs < width))[..., None, :]
    values = full_map.at(ys.clamp(0, height - 1), xs.clamp(0, width - 1))
    dist2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).to(values.dtype)
    logits = (values - dist2).masked_fill(~inside, float("-inf"))
    weights = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
    x = (weights * xs[..., None, :].to(values.dtype)).sum((-2, -1))
    y = (weights * ys[..., :, None].to(values.dtype)).sum((-2, -1))
    return torch.stack([x, y], dim=-1)


def refine_points_dense(points: torch.Tensor, full_map: torch.Tensor) -> torch.Tensor:
    """The same refinement over every pixel of a dense (n, H, W) map: the definition, kept for
    tests (it materialises n * K * H * W)."""
    n, height, width = full_map.shape
    prob = torch.softmax(full_map.flatten(1), dim=-1).view(n, 1, height, width)
    yy = torch.arange(height, dtype=full_map.dtype, device=full_map.device)[:, None]
    xx = torch.arange(width, dtype=full_map.dtype, device=full_map.device)[None, :]
    px = points[..., 0, None, None].to(full_map.dtype)
    py = points[..., 1, None, None].to(full_map.dtype)
    weights = torch.exp(-((xx - px) ** 2 + (yy - py) ** 2)) * prob
    weights = weights / weights.sum((-2, -1), keepdim=True)
    return torch.stack([(weights * xx).sum((-2, -1)), (weights * yy).sum((-2, -1))], dim=-1)


def to_sam_frame(points: torch.Tensor, original_size: tuple[int, int], resized_size: tuple[int, int]) -> torch.Tensor:
    """Original-image (x, y) -> SAM's resized input frame (ResizeLongestSide: scale by the resized /
    original side lengths, as `segment_anything` maps coordinates)."""
    (height, width), (rh, rw) = original_size, resized_size
    return points * points.new_tensor([rw / width, rh / height])


# --- the module ---------------------------------------------------------------------------------
@dataclass
class SasPResult:
    """SasP's work for n [SEG]s of one image. K = num_points.

    scores:     (n, P) raw [SEG] . image-token similarities (float32 for "exact" geometry, the
                hidden states' dtype for "read").
    grid:       (n, h, w) float32 coarse map the cells were chosen from (-1 = padding that undoes
                the crop).
    cells:      (n, K, 2) long, integer (x, y) cell centres in original pixels.
    points:     (n, K, 2) refined (x, y) in original pixels (differentiable in the scores).
    sam_points: (n, K, 2) the same in SAM's input frame.
    labels:     (n, K) long: 1 positive, 0 negative, -1 neutral / fill.
    valid:      (n, K) bool: False for fill entries.
    """

    scores: torch.Tensor
    grid: torch.Tensor
    cells: torch.Tensor
    points: torch.Tensor
    sam_points: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    original_size: tuple[int, int]
    clip_size: int
    geometry: str = "read"

    def sam_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(coords (n, K, 2) float, labels (n, K) long) for SAM's prompt encoder."""
        return self.sam_points, self.labels

    def full_map(self) -> torch.Tensor:
        """(n, H, W) full-resolution map in [0, 1], the one the refinement used."""
        return full_resolution_map(self.scores, self.original_size, self.clip_size, self.geometry)

    def detached_cpu(self) -> "SasPResult":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).detach().cpu()
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def similarity_as_points(seg_hidden: torch.Tensor, image_hidden: torch.Tensor, original_size: tuple[int, int],
                         resized_size: tuple[int, int], cfg: SasPConfig, clip_size: int) -> SasPResult:
    """SasP for n [SEG]s of one image.

    seg_hidden:   (n, H) final-norm LLM states that predicted each [SEG] (before text_hidden_fcs).
    image_hidden: (n, P) x H final-norm LLM states at the P image-token positions of each [SEG]'s
                  conversation.
    original_size (H, W) of the image, resized_size (h, w) of SAM's input before padding,
    clip_size the CLIP crop side (336 for ViT-L/14-336), the side READ's full-resolution map is
    resized to before its aspect padding (READ hard-codes 336).
    """
    validate_sasp_config(cfg)
    geometry = cfg.geometry
    original_size = (int(original_size[0]), int(original_size[1]))
    scores = similarity_scores(seg_hidden, image_hidden, geometry)
    grid = coarse_grid(scores.detach(), original_size, int(cfg.down_sample), geometry)
    cells, labels, valid = select_cells(grid, int(cfg.num_points), cfg.t_pos, cfg.t_neg)
    centres = cell_centres(cells, tuple(grid.shape[1:]), original_size, geometry)
    refined = refine_points(centres, full_map_factors(scores, original_size, clip_size, geometry), original_size)
    refined = torch.where(valid[..., None], refined, torch.zeros_like(refined))
    return SasPResult(scores=scores, grid=grid, cells=centres, points=refined,
                      sam_points=to_sam_frame(refined, original_size, resized_size), labels=labels, valid=valid,
                      original_size=original_size, clip_size=int(clip_size), geometry=geometry)


# --- command line -------------------------------------------------------------------------------
def add_sasp_arguments(parser: argparse.ArgumentParser) -> None:
    """--use_sasp and one flag per SasPConfig knob; knobs left unset keep the checkpoint's or READ-7B's."""
    d = SasPConfig()
    group = parser.add_argument_group("READ SasP (similarity as points)")
    group.add_argument("--use_sasp", action="store_true",
                       help="turn SasP on for a checkpoint that does not have it (e.g. fine-tune READ from SESAME)")
    group.add_argument("--num_points", type=int, default=None, help=f"points per [SEG] (default {d.num_points})")
    group.add_argument("--t_pos", type=float, default=None, help=f"positive threshold (default {d.t_pos})")
    group.add_argument("--t_neg", type=float, default=None, help=f"negative threshold (default {d.t_neg})")
    group.add_argument("--down_sample", type=int, default=None,
                       help=f"similarity grid down-sampling factor (default {d.down_sample})")
    group.add_argument("--sasp_geometry", choices=GEOMETRIES, default=None,
                       help=f"'read': compute as READ's code (what its weights were trained with); 'exact': "
                            f"undo CLIP's crop exactly, float32 scores (default {d.geometry})")


def sasp_config_from_args(args: argparse.Namespace, current: Optional[SasPConfig] = None) -> Optional[SasPConfig]:
    """The SasPConfig the flags ask for: `current` (e.g. from a READ checkpoint) or READ-7B's
    defaults under --use_sasp, with every knob given on the command line applied. None when SasP is
    neither in the checkpoint nor asked for; knobs without --use_sasp on a SESAME model are an error."""
    flags = {"num_points": "num_points", "t_pos": "t_pos", "t_neg": "t_neg", "down_sample": "down_sample",
             "sasp_geometry": "geometry"}  # flag -> SasPConfig field
    given = {flag: getattr(args, flag, None) for flag in flags if getattr(args, flag, None) is not None}
    if current is None and not getattr(args, "use_sasp", False):
        if given:
            raise ValueError(f"--{' --'.join(given)} set but SasP is off: add --use_sasp or load a READ checkpoint")
        return None
    cfg = dataclasses.replace(current or SasPConfig(), **{flags[flag]: v for flag, v in given.items()})
    validate_sasp_config(cfg)
    return cfg
