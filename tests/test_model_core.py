"""Model core on a tiny random configuration (CPU, fp32)."""
import numpy as np
import pytest
import torch
from model_inputs import encoder_inputs as _inputs
from model_inputs import random_image as _image
from model_inputs import train_batch as _train_batch

from model.conversation import IMAGE_TOKEN_INDEX, build_prompt, tokenize_with_image
from model.lora import apply_lora, is_trainable, set_trainable
from model.tiny import tiny_model
from model.transforms import ClipTransform, SamTransform


def _force_seg_at(step_to_force, seg_id, eos_id):
    """A logits hook that emits [SEG] at a given step and EOS two steps later."""
    def hook(step, logits):
        logits = logits.clone()
        if step == step_to_force:
            logits[:, seg_id] += 1e4
        if step == step_to_force + 2:
            logits[:, eos_id] += 1e4
        return logits
    return hook


def test_tokens_and_prompt(tokenizer, token_ids):
    vocab = len(tokenizer)
    assert token_ids.seg == vocab - 3 and token_ids.im_start == vocab - 2 and token_ids.im_end == vocab - 1
    prompt = build_prompt("<image>\nIs there a cat?")
    assert prompt.startswith("A chat between a curious human")
    assert "USER: <im_start><image><im_end>\nIs there a cat? ASSISTANT:" in prompt
    ids = tokenize_with_image(prompt, tokenizer)
    assert ids[0] == token_ids.bos and ids.count(token_ids.bos) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[k - 1] == token_ids.im_start and ids[k + 1] == token_ids.im_end
    assert "curious user" in build_prompt("<image>\nx", template="vicuna_v1")
    assert build_prompt("<image>\nq", "a [SEG].").endswith("ASSISTANT: a [SEG].</s>")


def test_forward_backward_and_gradients(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    apply_lora(model)
    trainable = set(set_trainable(model))
    model.train()
    batch = _train_batch(tokenizer, token_ids, model,
                         [["Sure, it is [SEG].", "No, there is no dog."], ["Yes [SEG]."]], [(37, 53), (64, 41)])
    out = model(batch)
    for name in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss"):
        assert torch.isfinite(getattr(out, name)), name
    assert out.mask_bce_loss > 0 and out.mask_dice_loss > 0
    assert [m.shape for m in out.pred_masks] == [(1, 37, 53), (1, 64, 41)]
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    # SAM's IoU head is trainable (as in the original) but no SESAME loss reads its output.
    iou_head = {n for n in trainable if "iou_prediction_head" in n}
    assert iou_head and with_grad == trainable - iou_head
    # LoRA A gets zero gradient at init (B = 0), every other trainable part a non-zero one.
    for n, p in model.named_parameters():
        if n in trainable - iou_head and "lora_A" not in n and "output_hypernetworks_mlps.0" not in n \
                and "output_hypernetworks_mlps" in n:
            continue  # multimask hypernetworks 1-3 feed only the masks SESAME discards (zero gradient)
        if n in trainable - iou_head and "lora_A" not in n:
            assert p.grad.abs().sum() > 0, n


def test_mask_losses_are_means_over_masks(tokenizer, token_ids):
    """Two masks in one image and one in another: each mask loss is the mean of the three."""
    from model.losses import bce_loss_sum, dice_loss_sum
    model = tiny_model(token_ids, len(tokenizer))
    batch = _train_batch(tokenizer, token_ids, model, [["A [SEG] and [SEG]."], ["Yes [SEG]."]], [(30, 30), (20, 40)])
    out = model(batch)
    preds = [m for p in out.pred_masks for m in p]
    gts = [g.float() for m in batch.masks for g in m]
    bce = sum(bce_loss_sum(p[None], g[None]) for p, g in zip(preds, gts)) / 3
    dice = sum(dice_loss_sum(p[None], g[None]) for p, g in zip(preds, gts)) / 3
    torch.testing.assert_close(out.mask_bce_loss, bce)
    torch.testing.assert_close(out.mask_dice_loss, dice)
    torch.testing.assert_close(out.loss, out.ce_loss + 2.0 * bce + 0.5 * dice)


def test_batched_mask_losses_equal_per_image_losses():
    """Images of different sizes, with ignored pixels: one padded batch gives each image's own sums
    (values and gradients)."""
    from model.losses import bce_loss_sum, dice_loss_sum, mask_loss_sums
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 7), (1, 9, 4), (3, 6, 6)]
    logits = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    gts = [torch.randint(0, 2, s, generator=gen).to(torch.uint8) for s in shapes]
    gts[1][0, :3] = 255  # ignored rows
    bce, dice, n = mask_loss_sums(logits, gts, 255)
    assert n == 6
    grads = torch.autograd.grad(bce + dice, logits)
    ref_bce = sum(bce_loss_sum(x, g == 1, g != 255) for x, g in zip(logits, gts))
    ref_dice = sum(dice_loss_sum(x, g == 1, g != 255) for x, g in zip(logits, gts))
    torch.testing.assert_close(bce, ref_bce)
    torch.testing.assert_close(dice, ref_dice)
    for got, want in zip(grads, torch.autograd.grad(ref_bce + ref_dice, logits)):
        torch.testing.assert_close(got, want)


def test_no_mask_batch_has_zero_mask_loss(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    batch = _train_batch(tokenizer, token_ids, model, [["No, there is no dog."]], [(30, 20)])
    out = model(batch)
    assert out.mask_bce_loss == 0 and out.mask_dice_loss == 0 and out.ce_loss > 0


def test_seg_count_mismatch_is_an_error(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    batch = _train_batch(tokenizer, token_ids, model, [["Yes [SEG]."]], [(30, 20)])
    batch.masks = [torch.zeros(2, 30, 20, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="ground-truth masks"):
        model(batch)


def test_dice_matches_hand_computation():
    from model.losses import dice_loss_sum
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    gt = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    p = torch.sigmoid(logits).flatten()
    g = gt.flatten()
    s = 1000.0
    expected = 1 - (2 * (p / s * g).sum() + 1e-6) / ((p / s).sum() + (g / s).sum() + 1e-6)
    torch.testing.assert_close(dice_loss_sum(logits, gt), expected)


def test_seg_embedding_kv_cache_equals_teacher_forced(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    img = _image(45, 70)
    clip, sam, resized, original = _inputs(model, [img])
    prompt = tokenize_with_image(build_prompt("<image>\nWhere is the red square?", template="vicuna_v1"), tokenizer)
    hook = _force_seg_at(3, token_ids.seg, token_ids.eos)
    pred = model.predict(clip, sam, resized, original, [prompt], [0], max_new_tokens=10,
                         logits_hook=hook)[0]
    assert pred.output_ids.count(token_ids.seg) == 1 and pred.output_ids[-1] == token_ids.eos
    # teacher-forced forward over prompt + generated answer
    full = torch.tensor([prompt + pred.output_ids])
    feats = model.encode_images_clip(clip)
    spliced = model.splice_image_features(full, torch.ones_like(full), feats)
    hidden = model.language_model.model(inputs_embeds=spliced.embeds,
                                        attention_mask=spliced.attention_mask).last_hidden_state
    before_seg = (spliced.token_ids[0, 1:] == token_ids.seg).nonzero()[0, 0]
    torch.testing.assert_close(pred.seg_hidden[0], hidden[0, before_seg], atol=1e-5, rtol=1e-4)
    assert pred.masks.shape == (1, 45, 70)


def test_batched_left_padded_generation_equals_single(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer), seed=3)
    images = [_image(40, 60, 1), _image(64, 32, 2)]
    clip, sam, resized, original = _inputs(model, images)
    questions = ["<image>\nIs there a dog?", "<image>\nCan you confirm if the man in red is present in this image?",
                 "<image>\nwhite car"]
    prompts = [tokenize_with_image(build_prompt(q), tokenizer) for q in questions]
    assert len({len(p) for p in prompts}) == 3
    image_index = [0, 1, 1]
    hook = _force_seg_at(2, token_ids.seg, token_ids.eos)
    batched = model.predict(clip, sam, resized, original, prompts, image_index, max_new_tokens=6)
    alone = [model.predict(clip[i:i + 1], sam[i:i + 1], resized[i:i + 1], original[i:i + 1], [p], [0],
                           max_new_tokens=6)[0] for p, i in zip(prompts, image_index)]
    assert [b.output_ids for b in batched] == [a.output_ids for a in alone]
    seg_b = model.predict(clip, sam, resized, original, prompts, image_index, max_new_tokens=6, logits_hook=hook)
    seg_a = [model.predict(clip[i:i + 1], sam[i:i + 1], resized[i:i + 1], original[i:i + 1], [p], [0],
                           max_new_tokens=6, logits_hook=hook)[0]
             for p, i in zip(prompts, image_index)]
    for b, a in zip(seg_b, seg_a):
        torch.testing.assert_close(b.seg_hidden, a.seg_hidden, atol=1e-5, rtol=1e-4)
        assert torch.equal(b.masks, a.masks)


def test_no_seg_gives_empty_mask_and_see_false(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    clip, sam, resized, original = _inputs(model, [_image(33, 51)])
    prompt = tokenize_with_image(build_prompt("<image>\nIs there a dog?"), tokenizer)

    def never_seg(step, logits):
        logits = logits.clone()
        logits[:, token_ids.seg] = -1e9
        return logits
    pred = model.predict(clip, sam, resized, original, [prompt], [0], max_new_tokens=5, logits_hook=never_seg)[0]
    assert token_ids.seg not in pred.output_ids
    assert pred.masks.shape == (0, 33, 51) and pred.exists is False


@pytest.mark.parametrize("size", [(33, 51), (77, 20), (1, 3)])
def test_masks_come_back_at_original_size(tokenizer, token_ids, size):
    model = tiny_model(token_ids, len(tokenizer))
    clip, sam, resized, original = _inputs(model, [_image(*size)])
    prompt = tokenize_with_image(build_prompt("<image>\nthe square"), tokenizer)
    pred = model.predict(clip, sam, resized, original, [prompt], [0], max_new_tokens=4,
                         logits_hook=_force_seg_at(0, token_ids.seg, token_ids.eos))[0]
    assert pred.masks.shape == (1, *size) and pred.masks.dtype == torch.bool
    assert pred.exists == bool(pred.masks[0].any())


def test_empty_predicted_mask_means_not_present(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    with torch.no_grad():  # mask decoder output bias -> all logits very negative
        model.visual_model.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight.zero_()
        model.visual_model.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias.zero_()
    clip, sam, resized, original = _inputs(model, [_image(20, 30)])
    prompt = tokenize_with_image(build_prompt("<image>\nthe square"), tokenizer)
    pred = model.predict(clip, sam, resized, original, [prompt], [0], max_new_tokens=3,
                         logits_hook=_force_seg_at(0, token_ids.seg, token_ids.eos))[0]
    assert token_ids.seg in pred.output_ids and not pred.masks.any() and pred.exists is False


def test_bf16_forward_and_predict(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer), dtype=torch.bfloat16)
    assert model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    batch = _train_batch(tokenizer, token_ids, model, [["Yes [SEG]."]], [(30, 20)])
    out = model(batch.to("cpu", torch.bfloat16))
    assert torch.isfinite(out.loss)
    clip, sam, resized, original = _inputs(model, [_image(20, 30)])
    prompt = tokenize_with_image(build_prompt("<image>\nthe square"), tokenizer)
    pred = model.predict(clip, sam, resized, original, [prompt], [0], max_new_tokens=3,
                         logits_hook=_force_seg_at(0, token_ids.seg, token_ids.eos))[0]
    assert pred.masks.shape == (1, 20, 30)


def test_trainable_split_by_name(tokenizer, token_ids):
    model = tiny_model(token_ids, len(tokenizer))
    apply_lora(model)
    names = set_trainable(model)
    lora = [n for n in names if "lora_" in n]
    n_layers = model.config.llm.num_hidden_layers
    assert len(lora) == n_layers * 2 * 2  # q and v, A and B
    assert all(".self_attn.q_proj." in n or ".self_attn.v_proj." in n for n in lora)
    assert all(n.startswith("llm.") for n in lora)
    groups = {"lm_head", "embed_tokens", "visual_model.mask_decoder", "text_hidden_fcs"}
    for g in groups:
        assert any(g in n for n in names), g
    for n, p in model.named_parameters():
        frozen_part = n.startswith(("vision_tower.", "mm_projector.", "visual_model.image_encoder.",
                                    "visual_model.prompt_encoder."))
        if frozen_part:
            assert not p.requires_grad, n
        if n.startswith("llm.") and ".layers." in n and "lora_" not in n:
            assert not p.requires_grad, n
    assert not is_trainable("visual_model.mask_decoder.x", train_mask_decoder=False)


def test_preprocessing_matches_independent_pil():
    from PIL import Image
    img = _image(301, 457, 7)
    # CLIP: shortest side -> 112 bicubic (long side truncated), centre crop, CLIP mean/std
    s = 112
    h, w = img.shape[:2]
    nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    r = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC, reducing_gap=None), dtype=np.float32)
    top, left = (nh - s) // 2, (nw - s) // 2
    c = r[top:top + s, left:left + s] / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = ((c - mean) / std).transpose(2, 0, 1)
    got = ClipTransform(s)(img).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # SAM: longest side -> 1024 with int(x*scale+0.5), bilinear, (x-mean)/std, zero pad
    sam = SamTransform(1024)(img)
    scale = 1024 / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    assert sam.resized_size == (rh, rw) and sam.original_size == (h, w)
    rs = np.asarray(Image.fromarray(img).resize((rw, rh), Image.BILINEAR), dtype=np.float32)
    norm = (rs - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(sam.pixels[:, :rh, :rw].numpy(), norm.transpose(2, 0, 1), atol=1e-4)
    assert sam.pixels.shape == (3, 1024, 1024)
    assert float(sam.pixels[:, rh:, :].abs().sum()) == 0 and float(sam.pixels[:, :, rw:].abs().sum()) == 0


def test_sdpa_sam_attention_equals_library_attention():
    """The SDPA image-encoder attention and the window handling of WindowedBlock give the library's
    outputs (windowed and global blocks)."""
    from sam_reference import library_encoder

    from model.config import SAM_PRESETS
    from model.sam import SdpaSamAttention, WindowedBlock, build_sam
    torch.manual_seed(0)
    sam = build_sam(SAM_PRESETS["tiny"])
    encoder = sam.image_encoder
    assert all(isinstance(b, WindowedBlock) and isinstance(b.attn, SdpaSamAttention) for b in encoder.blocks)
    for p in encoder.parameters():  # rel-pos tables start at zero: make them matter
        torch.nn.init.normal_(p, std=0.1)
    reference = library_encoder(encoder)
    assert reference.state_dict().keys() == encoder.state_dict().keys()
    assert all(isinstance(b, WindowedBlock) for b in encoder.blocks)
    assert not any(isinstance(b, WindowedBlock) or isinstance(b.attn, SdpaSamAttention) for b in reference.blocks)
    x = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(encoder(x), reference(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("h,w,window", [(10, 9, 7), (14, 14, 7), (5, 12, 4), (3, 3, 8)])
def test_window_partition_and_reverse_equal_the_library(h, w, window):
    """WindowedBlock's window handling: the same windows (zero padded) and the same residual sum as
    segment_anything's window_partition / window_unpartition, bit for bit."""
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    from model.sam import add_unpartitioned, partition_windows

    torch.manual_seed(0)
    x = torch.randn(2, h, w, 6)
    want, pad_hw = window_partition(x, window)
    got = partition_windows(x, window)
    assert torch.equal(got, want)
    windows = torch.randn_like(want)
    shortcut = torch.randn_like(x)
    want_sum = shortcut + window_unpartition(windows, window, pad_hw, (h, w))
    assert torch.equal(add_unpartitioned(shortcut, windows, window), want_sum)
    with_grad = add_unpartitioned(shortcut.requires_grad_(), windows, window)  # the autograd path
    assert torch.equal(with_grad.detach(), want_sum)
    with_grad.sum().backward()
    assert torch.equal(shortcut.grad, torch.ones_like(shortcut))


@pytest.mark.parametrize("shape", [(3, 3), (1, 3), (3, 7), (2, 2)])
def test_clip_transform_reads_tiny_images_as_channels_last(shape):
    """A 3-pixel-high image is (3, W, 3): the CLIP processor must not take its rows for channels."""
    from model.transforms import CLIP_MEAN, CLIP_STD, ClipTransform

    image = np.zeros((*shape, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 100, 200
    out = ClipTransform(32)(image)
    assert out.shape == (3, 32, 32)
    for c, value in enumerate((10, 100, 200)):
        want = (value / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(out[c], torch.full((32, 32), want), atol=1e-4, rtol=0)


def test_splice_equals_the_per_row_definition(tokenizer, token_ids):
    """splice_image_features (one gather per tensor) against its definition: per row, the text before
    the placeholder, the row's P image features, the text after it. Placeholders at different places,
    labels and attention masks carried along, gradients reaching text embeddings and image features alike."""
    from model.conversation import IGNORE_INDEX

    torch.manual_seed(0)
    model = tiny_model(token_ids, len(tokenizer))
    length, patches = 9, 4
    ids = torch.randint(3, 60, (3, length))
    for row, at in enumerate((0, 4, length - 1)):
        ids[row, at] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # left padding
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, torch.full_like(ids, IGNORE_INDEX))
    feats = torch.randn(3, patches, model.config.llm.hidden_size, requires_grad=True)
    out = model.splice_image_features(ids, mask, feats, labels)

    embed = model.language_model.get_input_embeddings()
    text = embed(ids.clamp(min=0))
    want_e, want_m, want_t, want_l = [], [], [], []
    for b in range(3):
        p = int((ids[b] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
        want_e.append(torch.cat([text[b, :p], feats[b], text[b, p + 1:]]))
        want_m.append(torch.cat([mask[b, :p], torch.ones(patches, dtype=mask.dtype), mask[b, p + 1:]]))
        want_t.append(torch.cat([ids[b, :p], torch.full((patches,), IMAGE_TOKEN_INDEX), ids[b, p + 1:]]))
        want_l.append(torch.cat([labels[b, :p], torch.full((patches,), IGNORE_INDEX), labels[b, p + 1:]]))
    want = torch.stack(want_e)
    assert torch.equal(out.embeds, want)
    assert torch.equal(out.attention_mask, torch.stack(want_m).long())
    assert torch.equal(out.token_ids, torch.stack(want_t)) and torch.equal(out.labels, torch.stack(want_l))
    assert out.image_start.tolist() == [0, 4, length - 1]
    weights = torch.randn_like(want)
    got_grads = torch.autograd.grad((out.embeds * weights).sum(), [feats, embed.weight])
    want_grads = torch.autograd.grad((want * weights).sum(), [feats, embed.weight])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
