"""model.sam.decode_masks runs SAM's mask decoder itself on channels-last tensors (no per-prompt
repeat of the image embedding or positional encoding): the same logits as the library's
MaskDecoder called the old way, and the transformer's image tokens a contiguous (n, h*w, C) view."""
from typing import Optional

import pytest
import torch

from model.config import SAM_PRESETS
from model.sam import build_sam, decode_masks


def old_decode_masks(sam, image_embeddings: torch.Tensor, seg_embeddings: torch.Tensor,
                     points: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The previous body of decode_masks: a zero image embedding, each prompt's own embedding in its
    dense prompt, and segment_anything's MaskDecoder.forward with multimask_output=False."""
    n = seg_embeddings.shape[0]
    dtype = seg_embeddings.dtype
    sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
    sparse = torch.cat([sparse.to(dtype).expand(n, -1, -1), seg_embeddings.unsqueeze(1)], dim=1)
    own_image = image_embeddings.to(dtype) + dense.to(dtype)
    low_res, _ = sam.mask_decoder(
        image_embeddings=torch.zeros_like(own_image[:1]),
        image_pe=sam.prompt_encoder.get_dense_pe().to(dtype),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=own_image,
        multimask_output=False,
    )
    return low_res


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    model = build_sam(SAM_PRESETS["tiny"]).eval()  # C = 32, an 8 x 8 embedding grid
    for p in model.parameters():  # random weights everywhere (LayerNorms, biases included)
        torch.nn.init.normal_(p, std=0.2)
    return model


def inputs(sam, n: int, dtype: torch.dtype, with_points: bool, shared: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = sam.prompt_encoder.embed_dim
    h, w = sam.prompt_encoder.image_embedding_size
    if shared:  # all prompts on one image: an expanded view, as tests/test_sasp.py passes it
        embeddings = torch.randn(1, c, h, w, generator=g).expand(n, -1, -1, -1)
    else:  # each prompt on its own image (rows differ)
        embeddings = torch.randn(n, c, h, w, generator=g)
    seg = torch.randn(n, c, generator=g).to(dtype)
    points = None
    if with_points:
        size = sam.prompt_encoder.input_image_size[0]
        points = (torch.rand(n, 3, 2, generator=g) * size, torch.randint(0, 2, (n, 3), generator=g))
    return embeddings.to(dtype), seg, points


# bfloat16: both paths feed the transformer bitwise-equal tensors, but the CPU's bf16 linears give other
# roundings for a transposed (old) than a contiguous (new) input (seen first in the first cross
# attention's k_proj), and those carry through the layers: the logits (|x| <= ~0.11 with these weights)
# differ by up to ~1.6e-3, about 3 bf16 ulps of the largest, ~0.6% of their norm.
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-3, rtol=1.6e-2)}


def in_dtype(sam, dtype: torch.dtype):
    """sam in dtype with its Fourier positional Gaussian kept float32, as SesameModel._apply keeps it."""
    sam = sam.to(dtype)
    pe = sam.prompt_encoder.pe_layer
    pe.positional_encoding_gaussian_matrix.data = pe.positional_encoding_gaussian_matrix.data.float()
    return sam


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_points", [False, True])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_same_logits_as_the_library_decoder(sam, dtype, with_points, n):
    sam = in_dtype(sam, dtype)
    embeddings, seg, points = inputs(sam, n, dtype, with_points, seed=n)
    with torch.no_grad():
        new = decode_masks(sam, embeddings, seg, points)
        old = old_decode_masks(sam, embeddings, seg, points)
    h, w = sam.prompt_encoder.image_embedding_size
    assert new.shape == old.shape == (n, 1, 4 * h, 4 * w) and new.dtype == old.dtype == dtype
    torch.testing.assert_close(new, old, **TOLERANCES[dtype])
    if dtype == torch.bfloat16:  # and the rounding differences stay small overall
        assert (new.float() - old.float()).norm() < 1e-2 * old.float().norm()


@pytest.mark.parametrize("with_points", [False, True])
def test_prompts_on_one_shared_image(sam, with_points):
    sam = in_dtype(sam, torch.float32)
    embeddings, seg, points = inputs(sam, 5, torch.float32, with_points, shared=True)
    with torch.no_grad():
        torch.testing.assert_close(decode_masks(sam, embeddings, seg, points),
                                   old_decode_masks(sam, embeddings, seg, points), atol=1e-5, rtol=1e-5)


def test_gradients_match(sam):
    """Training backpropagates through decode_masks: the same gradients as the library path, for the
    inputs and SAM's parameters, including which parameters get one at all (the unused mask MLPs a zero
    gradient, the IoU head none)."""
    sam = in_dtype(sam, torch.float32)
    embeddings, seg, points = inputs(sam, 3, torch.float32, True)
    weights = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (decode_masks, old_decode_masks):
        sam.zero_grad(set_to_none=True)
        emb, s = embeddings.clone().requires_grad_(), seg.clone().requires_grad_()
        (fn(sam, emb, s, points) * weights).sum().backward()
        grads.append({"embeddings": emb.grad, "seg": s.grad,
                      **{name: p.grad for name, p in sam.named_parameters() if p.grad is not None}})
    sam.zero_grad(set_to_none=True)
    new, old = grads
    assert new.keys() == old.keys() and "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight" in new
    assert not any("iou_prediction_head" in name for name in new)
    for name, g in old.items():
        # relative to each gradient's size (the [SEG] ones are ~1e-3 with these weights); the key-bias
        # gradients are zero but for rounding (softmax ignores a shift), ~1e-10, hence the floor
        scale = max(float(g.abs().max()), 1e-3)
        torch.testing.assert_close(new[name], g, atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_points", [False, True])
def test_transformer_gets_contiguous_image_tokens(sam, with_points, shared):
    """The (n, h*w, C) token views TwoWayTransformer takes of its image and positional inputs are
    contiguous (an NCHW image embedding would make them transposed, strided views)."""
    sam = in_dtype(sam, torch.float32)
    seen = []
    hook = sam.mask_decoder.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[:2]))
    try:
        embeddings, seg, points = inputs(sam, 4, torch.float32, with_points, shared=shared)
        with torch.no_grad():
            decode_masks(sam, embeddings, seg, points)
    finally:
        hook.remove()
    (image, pe), = seen
    assert image.shape[0] == 4 and pe.shape[0] == 1  # the positional encoding is not repeated per prompt
    for x in (image, pe):
        assert x.flatten(2).permute(0, 2, 1).is_contiguous(), x.stride()


def test_no_prompts(sam):
    """n = 0 (never passed by SesameModel, which skips the decoder then): empty logits, not an error
    (the library path failed reshaping its empty mask product)."""
    sam = in_dtype(sam, torch.float32)
    embeddings, seg, _ = inputs(sam, 0, torch.float32, False)
    h, w = sam.prompt_encoder.image_embedding_size
    with torch.no_grad():
        assert decode_masks(sam, embeddings, seg).shape == (0, 1, 4 * h, 4 * w)
