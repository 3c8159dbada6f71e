"""utils/mask_rle_torch.py: a batch of masks encoded by tensor operations gives pycocotools' strings."""
import numpy as np
import pytest
import torch

from utils.mask_io import decode_rle, encode_rle
from utils.mask_rle_torch import encode_rle_stacks, encode_rles


def _masks(count=200, seed=0):
    rng = np.random.default_rng(seed)
    out = [np.zeros((3, 4), bool), np.ones((3, 4), bool), np.ones((1, 1), bool), np.zeros((1, 1), bool)]
    for i in range(count):
        h, w = rng.integers(1, 50, 2)
        kind = i % 4
        if kind == 0:  # noise: many short runs
            m = rng.random((h, w)) > 0.5
        elif kind == 1:  # a block, from a random first row to the right edge
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):, rng.integers(0, w):] = True
        elif kind == 2:
            m = rng.random((h, w)) > 0.97
        else:
            m = rng.random((h, w)) > 0.03
        out.append(m)
    long_runs = np.zeros((1500, 2000), bool)  # counts of a million pixels: several 5-bit groups each
    long_runs[:1400] = True
    return out + [long_runs]


def test_equal_to_pycocotools_in_one_call():
    masks = _masks()
    got = encode_rles([torch.from_numpy(m) for m in masks])
    for m, rle in zip(masks, got):
        assert rle == encode_rle(m)
        assert np.array_equal(decode_rle(rle), m)


def test_empty_shapes_and_bad_input():
    got = encode_rles([torch.zeros((0, 5), dtype=torch.bool), torch.ones((2, 2), dtype=torch.bool),
                       torch.zeros((4, 0), dtype=torch.bool)])
    assert got[0] == {"size": [0, 5], "counts": "0"} and got[2] == {"size": [4, 0], "counts": "0"}
    assert got[1] == encode_rle(np.ones((2, 2), bool))
    assert encode_rles([]) == []
    # stacks: mask after mask, stack after stack, empty stacks and empty shapes included
    ones = torch.ones((2, 3, 4), dtype=torch.bool)
    noise = torch.rand(3, 5, 2, generator=torch.Generator().manual_seed(0)) > 0.5
    assert encode_rle_stacks([ones, torch.zeros((0, 6, 6), dtype=torch.bool), torch.zeros((1, 0, 3), dtype=torch.bool),
                              noise]) == ([encode_rle(m.numpy()) for m in ones] + [{"size": [0, 3], "counts": "0"}]
                                          + [encode_rle(m.numpy()) for m in noise])
    with pytest.raises(ValueError, match="mask 0"):
        encode_rles([torch.zeros((2, 2, 2), dtype=torch.bool)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_equal_to_pycocotools_on_the_gpu():
    masks = _masks(seed=1)
    got = encode_rles([torch.from_numpy(m).cuda() for m in masks])
    assert got == [encode_rle(m) for m in masks]
