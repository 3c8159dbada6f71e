"""COCO run-length encoding of many masks at once, computed where the masks are (on the GPU).

Evaluation writes an RLE per predicted mask. pycocotools' encoder runs on the host and holds the GIL
for a whole mask (5 ms for a noisy 640 x 480 one), beside the thread that issues every GPU kernel.
Here a whole batch of masks is encoded by a few tensor operations, with two waits for the device;
the host only slices the resulting characters. The output is what `utils.mask_io.encode_rle` (that
is, pycocotools) writes, character for character (tests/test_mask_rle_torch.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

_GROUPS = 7  # 5-bit groups per count: 35 bits hold any difference of two counts below 2**31


def encode_rles(masks: Sequence[torch.Tensor]) -> list[dict]:
    """(H, W) bool masks of any sizes, on one device -> [{"size": [H, W], "counts": str}], in order."""
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(masks):
        if m.dim() != 2:
            raise ValueError(f"encode_rles expects (H, W) masks, mask {i} has shape {tuple(m.shape)}")
        by_shape.setdefault(tuple(m.shape), []).append(i)
    # masks of one shape stacked: a few copies for a batch, not one per mask
    encoded = encode_rle_stacks([torch.stack([masks[i] for i in members]) for members in by_shape.values()])
    out: list = [None] * len(masks)
    for i, rle in zip((i for members in by_shape.values() for i in members), encoded):
        out[i] = rle
    return out


def encode_rle_stacks(stacks: Sequence[torch.Tensor]) -> list[dict]:
    """(k, H, W) stacks of masks (each stack one shape; all on one device) -> one RLE dict per mask,
    stack after stack."""
    out: list = []
    todo = []  # (stack, flat position of its first mask)
    for stack in stacks:
        k, h, w = stack.shape
        if k == 0:
            continue
        if h * w == 0:  # pycocotools' value for an empty shape
            out += [{"size": [int(h), int(w)], "counts": "0"} for _ in range(k)]
        else:
            todo.append((stack, len(out)))
            out += [None] * k
    if not todo:
        return out
    device = todo[0][0].device
    flat = torch.cat([(stack != 0).transpose(1, 2).reshape(-1) for stack, _ in todo])  # COCO counts down columns
    shapes = [(int(stack.shape[1]), int(stack.shape[2])) for stack, _ in todo for _ in range(stack.shape[0])]
    places = [place + j for stack, place in todo for j in range(stack.shape[0])]
    sizes = torch.tensor([h * w for h, w in shapes], device=device)
    starts = torch.cumsum(sizes, 0) - sizes  # each mask's first pixel in `flat`

    # runs: a run starts at each mask's first pixel and wherever the value changes
    edge = torch.ones_like(flat)
    edge[1:] = flat[1:] != flat[:-1]
    edge[starts] = True
    run_start = edge.nonzero()[:, 0]  # (waits for the device)
    run_len = torch.diff(run_start, append=run_start.new_tensor([flat.numel()]))
    run_mask = torch.searchsorted(starts, run_start, right=True) - 1
    # counts begin with background: a mask whose first pixel is set gets a 0 count first
    lead_zero = (run_start == starts[run_mask]) & flat[run_start]
    slot = torch.cumsum(1 + lead_zero.long(), 0) - 1  # each run's place among all counts
    total = int(slot[-1]) + 1 if slot.numel() else 0
    counts = torch.zeros(total, dtype=torch.long, device=device)
    counts[slot] = run_len
    owner = torch.empty(total, dtype=torch.long, device=device)
    owner[slot] = run_mask
    owner[slot[lead_zero] - 1] = run_mask[lead_zero]

    # maskApi.c's rleToString: from the fourth count of a mask on, store the difference with the count
    # two back; write each value as 5-bit groups, low first, '0' + group, bit 5 set when more follow
    per_mask = torch.bincount(owner, minlength=len(shapes))
    rank = torch.arange(total, device=device) - (torch.cumsum(per_mask, 0) - per_mask)[owner]
    two_back = torch.cat([counts.new_zeros(2), counts[:-2]])[:total]
    value = counts - torch.where(rank > 2, two_back, torch.zeros_like(counts))
    shifted = value[:, None] >> (5 * torch.arange(_GROUPS, device=device))  # arithmetic, as C's on a long
    low = shifted & 0x1F
    after = shifted >> 5
    more = torch.where((low & 0x10) != 0, after != -1, after != 0)
    used = (~more).long().argmax(1) + 1  # groups up to the first with nothing after it
    chars = (low | (more.long() << 5)) + 48
    keep = torch.arange(_GROUPS, device=device)[None, :] < used[:, None]
    text = chars[keep].to(torch.uint8)  # (waits for the device)
    lengths = torch.zeros(len(shapes), dtype=torch.long, device=device).index_add_(0, owner, used)
    # both copies queued (into page-locked memory, as PyTorch does for non_blocking), then one wait
    text, lengths = text.to("cpu", non_blocking=True), lengths.to("cpu", non_blocking=True)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    data = text.numpy().tobytes()
    offset = 0
    for place, (h, w), n in zip(places, shapes, lengths.tolist()):
        out[place] = {"size": [h, w], "counts": data[offset:offset + n].decode("ascii")}
        offset += n
    return out
