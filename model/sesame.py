"""The SESAME model: LLaVA-1.5 (CLIP ViT-L/14 + 2-layer GELU projector + LLaMA) + SAM + text_hidden_fcs.

The [SEG] path, prompt to mask:
  prompt ids (one IMAGE_TOKEN_INDEX per row)
    -> `splice_image_features`: CLIP layer -2 patches -> mm_projector, spliced in at the placeholder
    -> LLaMA -> final-norm hidden states
    -> the state at the position *before* each [SEG] (the one that predicts [SEG])
    -> text_hidden_fcs (h -> h -> ReLU -> 256)
    -> one sparse prompt token for SAM's mask decoder (`model.sam.decode_masks`)
    -> mask logits at the original image size, threshold > 0.

Submodules are named so the released checkpoint keys map one-to-one (see `model/checkpoint.py`):
`llm.model.*` <-> `model.*`, `llm.lm_head` <-> `lm_head`, `mm_projector` <-> `model.mm_projector`,
`visual_model` <-> `model.visual_model`, `text_hidden_fcs` <-> `model.text_hidden_fcs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from .batch import SesameBatch
from .config import SesameConfig
from .conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .generation import LogitsHook, greedy_generate, positions_from_mask
from .losses import mask_loss_sums
from .sam import build_sam, decode_masks, masks_at_original_size
from .sasp import SasPResult, similarity_as_points

SAM_IGNORE_LABEL = 255
MASK_THRESHOLD = 0.0  # mask = logits > 0, as SAM's `mask_threshold`


@dataclass
class SesameOutput:
    loss: torch.Tensor
    ce_loss: torch.Tensor
    mask_bce_loss: torch.Tensor
    mask_dice_loss: torch.Tensor
    mask_loss: torch.Tensor
    pred_masks: list[torch.Tensor]  # per image (n_i, H, W) logits
    gt_masks: list[torch.Tensor]


@dataclass
class QueryPrediction:
    """One generated answer. `masks` holds one (H, W) bool mask per generated [SEG]."""

    output_ids: list[int]
    masks: torch.Tensor
    exists: bool  # See: the rule of `sees_object`
    seg_hidden: torch.Tensor = field(repr=False)  # (n_seg, H) LLM states that predicted each [SEG]
    sasp: Optional[SasPResult] = field(default=None, repr=False)  # READ only: maps and points per [SEG] (CPU)
    # COCO RLE of each mask (utils.mask_io's dicts), where the backend made them (the engine on CUDA)
    rles: Optional[list[dict]] = field(default=None, repr=False)


def sees_object(masks: torch.Tensor) -> bool:
    """See, the original's rule: the answer holds a [SEG] and the mask of the first one is not empty.
    masks: (n_seg, H, W) bool."""
    return bool(masks.shape[0] > 0 and masks[0].any())


@dataclass
class SegMasks:
    """The masks of one group's [SEG]s (an image's in training, one answer's at inference), in the
    order the [SEG]s were given."""

    logits: torch.Tensor  # (n, H, W) float32 at the image's original size; mask = logits > MASK_THRESHOLD
    sasp: Optional[SasPResult] = None  # READ: the SasP work behind them


@dataclass
class SplicedInputs:
    embeds: torch.Tensor  # (B, L + P - 1, H)
    attention_mask: torch.Tensor  # (B, L + P - 1) long
    token_ids: torch.Tensor  # (B, L + P - 1): ids, IMAGE_TOKEN_INDEX at image positions
    labels: Optional[torch.Tensor]
    image_start: torch.Tensor  # (B,) index of the first image position per row


def llama_config(cfg: SesameConfig) -> LlamaConfig:
    llm = cfg.llm
    lc = LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads, rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings, rope_theta=llm.rope_theta,
        pad_token_id=llm.pad_token_id, bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id,
        tie_word_embeddings=False, use_cache=True)
    lc._attn_implementation = cfg.attn_implementation
    return lc


def clip_config(cfg: SesameConfig) -> CLIPVisionConfig:
    v = cfg.vision
    cc = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                          num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                          image_size=v.image_size, patch_size=v.patch_size, projection_dim=v.projection_dim,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cc._attn_implementation = cfg.attn_implementation
    return cc


def build_projector(kind: str, vision_hidden: int, hidden: int) -> nn.Module:
    """LLaVA's projector: "mlp2x_gelu" (LLaVA-1.5) or one Linear ("linear", LLaVA-v1 / LISA)."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    if kind == "linear":
        return nn.Linear(vision_hidden, hidden)
    raise ValueError(f"unknown mm_projector_type {kind!r}; known: 'mlp2x_gelu', 'linear'")


class SesameModel(nn.Module):
    def __init__(self, config: SesameConfig, vision_tower: Optional[CLIPVisionModel] = None):
        super().__init__()
        self.config = config
        h = config.llm.hidden_size
        self.vision_tower = vision_tower if vision_tower is not None else CLIPVisionModel(clip_config(config))
        self.mm_projector = build_projector(config.mm_projector_type, config.vision.hidden_size, h)
        self.llm = LlamaForCausalLM(llama_config(config))
        self.visual_model = build_sam(config.sam)
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(
            nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, config.out_dim), nn.Dropout(0.0))])

    # --- plumbing -------------------------------------------------------------------------
    @property
    def language_model(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM, whether or not LoRA (peft) wraps it."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def seg_token_id(self) -> int:
        return self.config.seg_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def _apply(self, fn, recurse=True):
        # SAM's random-Fourier positional encoding stays float32 whatever the model dtype:
        # bf16 sin/cos of 2*pi*x*G loses the point positions.
        super()._apply(fn, recurse)
        pe = self.visual_model.prompt_encoder.pe_layer
        if pe.positional_encoding_gaussian_matrix.is_floating_point():
            pe.positional_encoding_gaussian_matrix.data = pe.positional_encoding_gaussian_matrix.data.float()
        return self

    # --- encoders -------------------------------------------------------------------------
    def encode_images_clip(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) -> (N, P, hidden): CLIP layer `select_layer`, CLS dropped, projected.
        Autograd records only trained parameters: none here in the released recipe (CLIP and the
        projector frozen), all with --train_all."""
        out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision.select_layer][:, 1:]
        return self.mm_projector(feats.to(next(self.mm_projector.parameters()).dtype))

    def encode_images_sam(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, C, S/p, S/p) SAM image embeddings (p: SAM's patch size); recorded by
        autograd only when the encoder is trained (--train_all), as for CLIP."""
        enc = self.visual_model.image_encoder
        return enc(pixel_values.to(enc.patch_embed.proj.weight.dtype))

    # --- sequence assembly ----------------------------------------------------------------
    def splice_image_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              image_features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> SplicedInputs:
        """Replace the one IMAGE_TOKEN_INDEX of each row by that row's P image features.

        input_ids (B, L); image_features (B, P, H), already matched row by row.
        """
        is_image = input_ids == IMAGE_TOKEN_INDEX
        per_row = is_image.sum(1)
        if not bool((per_row == 1).all()):
            raise ValueError(f"each prompt must hold exactly one image placeholder; counts per row: {per_row.tolist()}")
        embed = self.language_model.get_input_embeddings()
        text = embed(input_ids.masked_fill(is_image, 0))
        img_pos = is_image.float().argmax(1)
        # One gather per tensor, whatever the batch size (a per-row loop of cats costs ~50 ops a row): output
        # position j of row b is text[j] before the placeholder at p, image feature j - p inside it, and
        # text[j - P + 1] after it.
        length = input_ids.shape[1]
        num_patches = image_features.shape[1]
        j = torch.arange(length + num_patches - 1, device=input_ids.device)[None]
        start = img_pos[:, None]
        in_image = (j >= start) & (j < start + num_patches)
        text_index = torch.where(j < start, j, j - num_patches + 1).clamp(0, length - 1)
        image_index = (j - start).clamp(0, num_patches - 1)

        def spliced(rows: torch.Tensor, image_value) -> torch.Tensor:
            taken = rows.gather(1, text_index)
            return torch.where(in_image, image_value, taken)

        hidden = text.shape[-1]
        text_part = text.gather(1, text_index[..., None].expand(-1, -1, hidden))
        image_part = image_features.to(text.dtype).gather(1, image_index[..., None].expand(-1, -1, hidden))
        embeds = torch.where(in_image[..., None], image_part, text_part)
        labels_out = spliced(labels, IGNORE_INDEX) if labels is not None else None
        return SplicedInputs(embeds=embeds, attention_mask=spliced(attention_mask, 1).long(),
                             token_ids=spliced(input_ids, IMAGE_TOKEN_INDEX), labels=labels_out, image_start=img_pos)

    # --- [SEG] -> mask ----------------------------------------------------------------------
    def project_seg(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden states that predicted [SEG] (n, hidden) -> SAM prompt embeddings (n, out_dim)."""
        return self.text_hidden_fcs[0](seg_hidden)

    def sasp_points(self, seg_hidden: torch.Tensor, image_hidden: Optional[torch.Tensor],
                    resized_size: tuple[int, int], original_size: tuple[int, int]) -> SasPResult:
        """READ's Similarity-as-Points for the n [SEG]s of one image (see `model/sasp.py`)."""
        if image_hidden is None:
            raise ValueError("config.sasp is set but no image-token hidden states were passed (image_hidden)")
        return similarity_as_points(seg_hidden, image_hidden, original_size, resized_size, self.config.sasp,
                                    self.config.vision.image_size)

    def seg_masks(self, sam_embeddings: torch.Tensor, seg_hidden: torch.Tensor, seg_group: Sequence[int],
                  resized_sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]],
                  image_hidden: Optional[torch.Tensor] = None) -> list[SegMasks]:
        """Masks of n [SEG]s in G groups, with one SAM mask-decoder call. A group is the [SEG]s of one
        image (training: they are compared with that image's ground truth) or of one answer.

        sam_embeddings: (G, C, h, w) SAM embedding of each group's image.
        seg_hidden:     (n, hidden) LLM states that predicted each [SEG].
        seg_group:      n group indices, the group of each [SEG].
        resized_sizes / original_sizes: G sizes, of each group's image.
        image_hidden:   (n, P, hidden) image-token states of each [SEG]'s conversation (READ's SasP only).
        Returns one SegMasks per group; a group without [SEG] gets (0, H, W) logits.
        """
        sam = self.visual_model
        groups = sam_embeddings.shape[0]
        seg_group = [int(g) for g in seg_group]
        order_list = sorted(range(len(seg_group)), key=seg_group.__getitem__)  # [SEG]s grouped by group, stable
        counts = [0] * groups
        for g in seg_group:
            counts[g] += 1
        starts = [0, *accumulate(counts)][:groups]  # each group's first row in `order`
        device = seg_hidden.device
        order = torch.tensor(order_list, dtype=torch.long, device=device)
        sasp: list[Optional[SasPResult]] = [None] * groups
        if self.config.sasp is not None and seg_hidden.shape[0]:
            if image_hidden is None:
                raise ValueError("config.sasp is set but no image-token hidden states were passed (image_hidden)")
            for g in range(groups):
                if counts[g]:
                    rows = order[starts[g]:starts[g] + counts[g]]
                    sasp[g] = self.sasp_points(seg_hidden[rows], image_hidden[rows], resized_sizes[g],
                                               original_sizes[g])
        logits_of: list[Optional[torch.Tensor]] = [None] * groups
        if seg_hidden.shape[0]:
            owner = torch.tensor(sorted(seg_group), dtype=torch.long, device=sam_embeddings.device)
            done = [r for r in sasp if r is not None]
            points = (torch.cat([r.sam_points for r in done]), torch.cat([r.labels for r in done])) if done else None
            low_res = decode_masks(sam, sam_embeddings[owner], self.project_seg(seg_hidden[order]), points)
            # upscale, crop and resize once per (resized, original) size pair rather than once per group
            by_size: dict[tuple, list[int]] = {}
            for g in range(groups):
                if counts[g]:
                    by_size.setdefault((tuple(resized_sizes[g]), tuple(original_sizes[g])), []).append(g)
            for (resized, original), members in by_size.items():
                rows = torch.tensor([r for g in members for r in range(starts[g], starts[g] + counts[g])],
                                    device=low_res.device)
                logits = masks_at_original_size(sam, low_res[rows], resized, original)
                for g, part in zip(members, logits.split([counts[g] for g in members])):
                    logits_of[g] = part
        return [SegMasks(logits=logits_of[g] if counts[g] else
                         seg_hidden.new_zeros((0, *original_sizes[g]), dtype=torch.float32), sasp=sasp[g])
                for g in range(groups)]

    # --- training / teacher-forced forward ---------------------------------------------------
    def forward(self, batch: SesameBatch) -> SesameOutput:
        offset = batch.offset.tolist()
        num_images = len(offset) - 1
        conv_to_image = torch.repeat_interleave(torch.arange(num_images, device=batch.input_ids.device),
                                                torch.tensor([offset[i + 1] - offset[i] for i in range(num_images)],
                                                             device=batch.input_ids.device))
        clip_features = self.encode_images_clip(batch.images_clip)[conv_to_image]
        sam_embeddings = self.encode_images_sam(batch.images_sam)
        spliced = self.splice_image_features(batch.input_ids, batch.attention_mask, clip_features, batch.labels)

        out = self.language_model.model(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
                                        position_ids=positions_from_mask(spliced.attention_mask), use_cache=False)
        hidden = out.last_hidden_state  # final-norm states (the lm_head input)

        # CE only where a label exists: same mean as HF's shifted loss, without (B, L, V) logits.
        shift_labels = spliced.labels[:, 1:]
        supervised = shift_labels != IGNORE_INDEX
        if bool(supervised.any()):
            logits = self.language_model.lm_head(hidden[:, :-1][supervised])
            ce_loss = F.cross_entropy(logits.float(), shift_labels[supervised])
        else:
            ce_loss = hidden.sum() * 0.0

        # [SEG] states: the position whose next token is [SEG], in (conversation, position) order.
        predicts_seg = spliced.token_ids[:, 1:] == self.seg_token_id
        seg_counts = predicts_seg.sum(1)
        seg_hidden_all = hidden[:, :-1][predicts_seg]
        seg_rows = predicts_seg.nonzero()[:, 0]
        # A micro-batch without any [SEG] sends one dummy (a zero state, on its first image) through
        # text_hidden_fcs and the mask decoder, added times 0. Every rank then calls the mask decoder once
        # per training forward and gets gradients for the same parameters, whatever its micro-batch
        # holds: DeepSpeed ZeRO reduces gradients, and ZeRO-3 gathers parameters, collectively.
        dummy = (torch.is_grad_enabled() and seg_hidden_all.shape[0] == 0
                 and all(m.shape[0] == 0 for m in batch.masks))
        if dummy:
            seg_hidden_all = hidden.new_zeros((1, hidden.shape[-1]))
            seg_rows = seg_rows.new_zeros(1)

        image_hidden = None
        if self.config.sasp is not None:
            image_hidden = self._image_hidden_rows(hidden, spliced, seg_rows, clip_features.shape[1])
        per_image = self.seg_masks(sam_embeddings, seg_hidden_all, conv_to_image[seg_rows].tolist(),
                                   batch.resized_sizes, batch.original_sizes, image_hidden)

        pred_masks = [out_i.logits for out_i in per_image]
        if dummy:
            zero = 0.0 * pred_masks[0].sum()
            pred_masks[0] = pred_masks[0][:0]
        for i, (logits, gt) in enumerate(zip(pred_masks, batch.masks)):
            if logits.shape[0] != gt.shape[0]:
                raise ValueError(f"image {i}: {logits.shape[0]} [SEG] tokens but {gt.shape[0]} ground-truth masks "
                                 f"(seg tokens per conversation: {seg_counts[offset[i]:offset[i + 1]].tolist()})")
        with_masks = [i for i in range(num_images) if batch.masks[i].shape[0]]
        if with_masks:
            bce_sum, dice_sum, num_masks = mask_loss_sums([pred_masks[i] for i in with_masks],
                                                          [batch.masks[i] for i in with_masks], SAM_IGNORE_LABEL)
        else:
            bce_sum = dice_sum = zero if dummy else hidden.new_zeros((), dtype=torch.float32)
            num_masks = 0
        w = self.config.loss
        bce = bce_sum / (num_masks + 1e-8)
        dice = dice_sum / (num_masks + 1e-8)
        mask_loss = w.bce_loss_weight * bce + w.dice_loss_weight * dice
        loss = w.ce_loss_weight * ce_loss + mask_loss
        return SesameOutput(loss=loss, ce_loss=ce_loss, mask_bce_loss=bce, mask_dice_loss=dice, mask_loss=mask_loss,
                            pred_masks=pred_masks, gt_masks=list(batch.masks))

    def _image_hidden_rows(self, hidden: torch.Tensor, spliced: SplicedInputs, rows: torch.Tensor,
                           num_patches: int) -> torch.Tensor:
        """(n, P, hidden): the image-token states of the conversation each [SEG] belongs to."""
        starts = spliced.image_start[rows]
        idx = starts[:, None] + torch.arange(num_patches, device=hidden.device)[None]
        return hidden[rows[:, None], idx]

    # --- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        images_clip: torch.Tensor,
        images_sam: torch.Tensor,
        resized_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
        prompts: Sequence[Sequence[int]],
        image_index: Sequence[int],
        *,
        max_new_tokens: int = 512,
        logits_hook: Optional[LogitsHook] = None,
    ) -> list[QueryPrediction]:
        """Greedy answers and masks for several prompts over N images, as one batch: the reference
        inference path (the batched engine of `engine/` gives the same outputs, faster).

        Each image is encoded once (CLIP and SAM) whatever the number of its prompts. Prompts are
        token-id lists with one IMAGE_TOKEN_INDEX (see `conversation.tokenize_with_image`);
        `image_index[k]` names the image of prompt k. Rows are left padded; padding is masked.
        """
        device, llm = self.device, self.config.llm
        clip_features = self.encode_images_clip(images_clip.to(device))
        sam_embeddings = self.encode_images_sam(images_sam.to(device))
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), llm.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for k, p in enumerate(prompts):
            input_ids[k, length - len(p):] = torch.tensor(p, device=device)
            attention_mask[k, length - len(p):] = 1
        index = torch.as_tensor(list(image_index), device=device)
        spliced = self.splice_image_features(input_ids, attention_mask, clip_features[index])
        gen = greedy_generate(self.language_model, spliced.embeds, spliced.attention_mask,
                              max_new_tokens=max_new_tokens, eos_token_id=llm.eos_token_id,
                              seg_token_id=self.seg_token_id, logits_hook=logits_hook,
                              keep_prefill_hidden=self.config.sasp is not None)
        # one mask group per answer
        seg_query = [k for k, h in enumerate(gen.seg_hidden) for _ in range(h.shape[0])]
        seg_hidden = torch.cat(gen.seg_hidden)
        image_hidden = None
        if gen.prefill_hidden is not None:
            rows = torch.as_tensor(seg_query, dtype=torch.long, device=device)
            positions = spliced.image_start[rows][:, None] + torch.arange(clip_features.shape[1], device=device)
            image_hidden = gen.prefill_hidden[rows[:, None], positions]
        per_answer = self.seg_masks(sam_embeddings[index], seg_hidden, seg_query,
                                    [tuple(resized_sizes[i]) for i in image_index],
                                    [tuple(original_sizes[i]) for i in image_index], image_hidden)
        results = []
        for k, masks in enumerate(per_answer):
            binary = (masks.logits > MASK_THRESHOLD).cpu()
            results.append(QueryPrediction(output_ids=gen.tokens[k], masks=binary, exists=sees_object(binary),
                                           seg_hidden=gen.seg_hidden[k],
                                           sasp=masks.sasp.detached_cpu() if masks.sasp is not None else None))
        return results
