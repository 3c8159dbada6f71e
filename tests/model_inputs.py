"""Inputs for tiny-model tests: random images, preprocessed encoder inputs, training batches."""
import numpy as np
import torch

from model.batch import SesameBatch
from model.conversation import IGNORE_INDEX, build_prompt, tokenize_with_image
from model.transforms import ClipTransform, SamTransform


def random_image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def encoder_inputs(model, images):
    """(CLIP pixels, SAM pixels, resized sizes, original sizes) for a list of RGB images."""
    clip = ClipTransform(model.config.vision.image_size)
    sam = SamTransform(model.config.sam.image_size)
    sam_in = [sam(im) for im in images]
    return (torch.stack([clip(im) for im in images]), torch.stack([s.pixels for s in sam_in]),
            [s.resized_size for s in sam_in], [s.original_size for s in sam_in])


def train_batch(tokenizer, token_ids, model, answers_per_image, sizes):
    """One conversation per answer; labels supervise the answer and </s> only; one rectangular
    ground-truth mask per [SEG] (the k-th one a little wider than the one before)."""
    clip, sam, resized, original = encoder_inputs(model, [random_image(h, w, i) for i, (h, w) in enumerate(sizes)])
    rows, labels, offset, masks = [], [], [0], []
    for i, answers in enumerate(answers_per_image):
        n_seg = 0
        for a in answers:
            prompt = tokenize_with_image(build_prompt("<image>\nWhere is the red square?"), tokenizer)
            answer = tokenizer(" " + a, add_special_tokens=False).input_ids + [token_ids.eos]
            rows.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
            n_seg += a.count("[SEG]")
        offset.append(len(rows))
        h, w = sizes[i]
        gt = torch.zeros(n_seg, h, w, dtype=torch.uint8)
        for k in range(n_seg):
            gt[k, h // 4: h // 2, w // 3: w // 2 + k] = 1
        masks.append(gt)
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), token_ids.pad)
    lab = torch.full((len(rows), length), IGNORE_INDEX)
    att = torch.zeros((len(rows), length), dtype=torch.bool)
    for r, (x, y) in enumerate(zip(rows, labels)):
        ids[r, :len(x)], lab[r, :len(y)], att[r, :len(x)] = torch.tensor(x), torch.tensor(y), True
    return SesameBatch(images_clip=clip, images_sam=sam, input_ids=ids, labels=lab, attention_mask=att,
                       offset=torch.tensor(offset), masks=masks, resized_sizes=resized, original_sizes=original)
