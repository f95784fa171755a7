"""Sequence layout (official image blocks, labels) and batching (padding, packing masks/positions)."""

import pickle

import torch

from nextstep.data.format import Sample
from nextstep.model.checkpoint import build_model
from nextstep.model.config import NextStepConfig
from nextstep.model.tokenizer import EOS, IMAGE_AREA, TextTokenizer
from nextstep.train.sequences import IGNORE, SequenceBuilder, collate, special_ids
from tests.refs import ROOT

TINY = ROOT / "nextstep11-tiny"
TOK = TextTokenizer(TINY)
IDS = special_ids(TOK, 405, 406, 407, 401)


def builder(max_len=512, **kw):
    return SequenceBuilder(TOK, IDS, down_factor=2, max_len=max_len, **kw)


def latent(h, w):
    return torch.randn(16, 2 * h, 2 * w)


def test_t2i_layout_matches_the_inference_prompt():
    item = builder()(Sample("k", "a cat <image_0>", [latent(2, 3)]))
    text = TOK.encode("a cat ")
    area = TOK.encode(f"{IMAGE_AREA}2*3")
    expected = text + area + [405] + [407] * 6 + [406, TOK.token_id(EOS)]
    assert item.input_ids == expected
    assert item.labels == [IGNORE if t == 407 else t for t in expected]
    assert len(item.images) == 1


def test_edit_layout_two_blocks_and_truncation_drops_whole_images():
    s = Sample("k", "<image_0> make it red <image_1>", [latent(2, 2), latent(2, 2)])
    full = builder()(s)
    assert full.input_ids.count(405) == 2 and full.input_ids.count(407) == 8 and len(full.images) == 2
    cut = builder(max_len=len(full.input_ids) - 3)(s)  # the second image block no longer fits
    assert cut.input_ids.count(405) == 1 and len(cut.images) == 1
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]


def test_padding_and_packing_match_separate_forwards():
    torch.manual_seed(0)
    model = build_model(NextStepConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    b = builder()
    items = [
        b(Sample("a", "a red cat <image_0>", [latent(2, 2)])),
        b(Sample("b", "dog", [])),
        b(Sample("c", "<image_0> the end", [latent(1, 2)])),
    ]
    alone = []
    for item in items:
        ids = torch.tensor([item.input_ids])
        toks = torch.randn(ids.eq(407).sum(), 64, generator=torch.Generator().manual_seed(len(alone)))
        alone.append((toks, model.forward_hidden(model.embed(ids, toks))[0]))
    tokens = torch.cat([t for t, _ in alone])
    for pack in (False, True):
        batch = collate(items, ids=IDS, max_len=64, pack=pack, pad_to_multiple=8)
        assert batch.input_ids.shape[1] % 8 == 0
        assert (batch.attention_mask is not None) == pack
        assert batch.image_sample == [0, 2] and batch.image_tokens == [4, 2] and batch.num_samples == 3
        again = pickle.loads(pickle.dumps(batch))  # what crosses from a DataLoader worker
        assert [im.shape for im in again.images] == [im.shape for im in batch.images]
        assert all(torch.equal(a, b) for a, b in zip(again.images, batch.images, strict=True))
        assert torch.equal(again.input_ids, batch.input_ids) and again.seq_lens == batch.seq_lens
        again.offset_samples(10)
        assert again.image_sample == [10, 12] and batch.image_sample == [0, 2]
        hidden = model.forward_hidden(
            model.embed(batch.input_ids, tokens), position_ids=batch.position_ids, mask=batch.attention_mask
        )
        row, pos = 0, 0
        for item, (_, ref) in zip(items, alone, strict=True):
            n = len(item.input_ids)
            if not pack:
                row, pos = items.index(item), 0
            torch.testing.assert_close(hidden[row, pos : pos + n], ref, atol=1e-5, rtol=1e-5)
            assert batch.position_ids[row, pos : pos + n].tolist() == list(range(n))
            assert batch.labels[row, pos] == IGNORE  # no prediction across samples
            pos += n
        if pack:
            assert batch.input_ids.shape[0] == 1  # all three fit one row of 64
            assert (batch.labels[0, pos:] == IGNORE).all() and (batch.input_ids[0, pos:] == 401).all()
