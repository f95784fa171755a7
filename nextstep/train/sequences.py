"""Training sequences: a Sample becomes ids/labels in the official layout, and samples become a batch
(padded rows, or packed rows with block-diagonal attention and per-sample positions).

Layout: caption text tokens; each image as `<|image_area|>{h}*{w}` + boi + h*w placeholders + eoi, with
(h, w) the token grid; `<|endoftext|>` at the end. Labels are -100 on placeholders and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.data.format import Sample, caption_segments
from nextstep.model.tokenizer import EOS, IMAGE_AREA, TextTokenizer

IGNORE = -100


@dataclass
class SpecialIds:
    boi: int
    eoi: int
    placeholder: int
    pad: int
    eos: int


@dataclass
class Tokenized:
    """One sample as a sequence; `images[i]` fills the i-th run of placeholders."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]  # uint8 pixels (3, H, W), or latents (C, H/8, W/8)


class SequenceBuilder:
    """Turns Samples into `Tokenized` sequences; picklable, so DataLoader workers can run it."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        ids: SpecialIds,
        *,
        down_factor: int,
        max_len: int,
        add_eos: bool = True,
        channels: int | None = None,
    ) -> None:
        self.tokenizer, self.ids = tokenizer, ids
        self.down_factor = down_factor  # image pixels (or latent cells) per token side
        self.channels = channels  # 3 for pixels, C for latents: images of another depth are refused
        self.max_len, self.add_eos = max_len, add_eos

    def image_block(self, h: int, w: int) -> list[int]:
        """`<|image_area|>h*w` boi placeholder*(h*w) eoi, as the inference prompt spells it."""
        head = self.tokenizer.encode(f"{IMAGE_AREA}{h}*{w}") + [self.ids.boi]
        return head + [self.ids.placeholder] * (h * w) + [self.ids.eoi]

    def __call__(self, sample: Sample) -> Tokenized:
        ids: list[int] = []
        images: list[torch.Tensor] = []
        for seg in caption_segments(sample.caption):
            if isinstance(seg, str):
                piece = self.tokenizer.encode(seg)
            else:
                image = sample.images[seg]
                if self.channels is not None and image.shape[0] != self.channels:
                    kind = "pixels" if image.shape[0] == 3 else "latents"
                    raise ValueError(
                        f"sample {sample.key!r}: image {seg} holds {kind} {tuple(image.shape)}, expected "
                        f"{self.channels} channels: latent shards (nextstep data encode-latents) need "
                        "model.precomputed_latents=true, image shards false"
                    )
                h, w = image.shape[-2] // self.down_factor, image.shape[-1] // self.down_factor
                piece = self.image_block(h, w)
            if len(ids) + len(piece) > self.max_len:
                if isinstance(seg, str):  # keep the text that fits; an image block is all or nothing
                    ids += piece[: self.max_len - len(ids)]
                break
            ids += piece
            if not isinstance(seg, str):
                images.append(sample.images[seg])
        else:
            if self.add_eos and len(ids) < self.max_len:
                ids.append(self.ids.eos)
        labels = [IGNORE if t == self.ids.placeholder else t for t in ids]
        return Tokenized(ids, labels, images)


def special_ids(tokenizer: TextTokenizer, boi: int, eoi: int, placeholder: int, pad: int) -> SpecialIds:
    return SpecialIds(boi=boi, eoi=eoi, placeholder=placeholder, pad=pad, eos=tokenizer.token_id(EOS))


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 where no text loss
    position_ids: torch.Tensor  # (B, L), restarting at 0 for each packed sample
    attention_mask: torch.Tensor | None  # bool (B, 1, L, L) when packed; None = plain causal
    # Images stacked once per distinct shape: (their places in placeholder order, (n, C, H, W)). A few
    # tensors, not one per image, cross from the loader workers and move to the device.
    image_groups: list[tuple[list[int], torch.Tensor]]
    image_sample: list[int]  # index of each image's sample (position in the collated list, plus any offset)
    image_tokens: list[int]  # token count of each image
    num_text_targets: int  # text rows with a label (for throughput accounting)
    seq_lens: list[int]  # length of each packed/padded document (for attention FLOPs)
    num_samples: int = 0  # samples collated into this batch

    @property
    def images(self) -> list[torch.Tensor]:
        """Every image in placeholder order (row-major over the batch)."""
        out: list[torch.Tensor | None] = [None] * len(self.image_sample)
        for idx, stacked in self.image_groups:
            for i, im in zip(idx, stacked.unbind(0), strict=True):
                out[i] = im
        return out

    def offset_samples(self, offset: int) -> None:
        """Number this batch's samples from `offset` (their place in the global batch)."""
        self.image_sample = [offset + s for s in self.image_sample]

    def to(self, device: torch.device) -> TrainBatch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=True)
        return TrainBatch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            mask,
            [(idx, stacked.to(device, non_blocking=True)) for idx, stacked in self.image_groups],
            self.image_sample,
            self.image_tokens,
            self.num_text_targets,
            self.seq_lens,
            self.num_samples,
        )


def _stack_by_shape(images: list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """(indices, stacked images) per distinct image shape, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return [(idx, torch.stack([images[i] for i in idx])) for idx in groups.values()]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def collate(
    items: list[Tokenized], *, ids: SpecialIds, max_len: int, pack: bool, pad_to_multiple: int = 1
) -> TrainBatch:
    """Rows right-padded with pad ids (labels -100). Padding alone needs no mask: causal attention never
    lets a real token see the pads after it. Packing greedily fills rows of max_len in order and masks
    attention block-diagonally."""
    rows: list[list[tuple[int, Tokenized]]] = []  # (sample position, item)
    for i, item in enumerate(items):
        if pack and rows and sum(len(t.input_ids) for _, t in rows[-1]) + len(item.input_ids) <= max_len:
            rows[-1].append((i, item))
        else:
            rows.append([(i, item)])
    width = max(sum(len(t.input_ids) for _, t in row) for row in rows)
    width = min(_round_up(width, pad_to_multiple), max(max_len, width))
    b = len(rows)
    input_ids = torch.full((b, width), ids.pad, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    doc = torch.full((b, width), -1, dtype=torch.long)  # document id per position, -1 on padding
    images, image_sample, image_tokens, seq_lens = [], [], [], []
    for r, row in enumerate(rows):
        pos = 0
        for d, (sample, item) in enumerate(row):
            n = len(item.input_ids)
            input_ids[r, pos : pos + n] = torch.tensor(item.input_ids)
            labels[r, pos : pos + n] = torch.tensor(item.labels)
            labels[r, pos] = IGNORE  # never predict a sample's first token from the previous sample
            position_ids[r, pos : pos + n] = torch.arange(n)
            doc[r, pos : pos + n] = d
            pos += n
            seq_lens.append(n)
            grid_sizes = _image_token_counts(item, ids.placeholder)
            for im, count in zip(item.images, grid_sizes, strict=True):
                images.append(im)
                image_sample.append(sample)
                image_tokens.append(count)
        position_ids[r, pos:] = torch.arange(width - pos)
    mask = None
    if pack and any(len(row) > 1 for row in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
        own = torch.eye(width, dtype=torch.bool)[None]  # pad rows see themselves, so SDPA stays finite
        mask = ((same & causal[None]) | own)[:, None]  # (B, 1, L, L)
    # Text targets: labelled next tokens that are not image tokens (what lm_head is trained on).
    nxt = input_ids[:, 1:]
    text_targets = int(((labels[:, 1:] != IGNORE) & (nxt != ids.placeholder)).sum())
    groups = _stack_by_shape(images)
    return TrainBatch(
        input_ids, labels, position_ids, mask, groups, image_sample, image_tokens, text_targets, seq_lens, len(items)
    )


def _image_token_counts(item: Tokenized, placeholder: int) -> list[int]:
    """Lengths of the placeholder runs of a sequence, one per image."""
    counts, run = [], 0
    for t in item.input_ids:
        if t == placeholder:
            run += 1
        elif run:
            counts.append(run)
            run = 0
    if run:
        counts.append(run)
    return counts
