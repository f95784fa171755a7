"""Partial decoding: partial images of the right size, every k rows, the last one equal to the final image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextstep.assets import builtin_model_dir
from nextstep.sampling.partial import decode_partial, every_rows, fill_tokens
from nextstep.sampling.pipeline import Pipeline

SIZE = (64, 32)  # (height, width) px: a grid of 4 rows of 2 tokens with the built-in model's 16 px tokens
OPTS = {"size": SIZE, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    path = builtin_model_dir()
    if path is None:
        pytest.skip("the built-in model is not shipped in this checkout")
    return Pipeline.from_pretrained(path, device="cpu")


def test_fill_keeps_the_tokens_so_far_and_fills_with_their_mean():
    tokens = torch.arange(12.0).reshape(2, 3, 2)  # (B, k, D)
    full = fill_tokens(tokens, 5)
    assert full.shape == (2, 5, 2) and torch.equal(full[:, :3], tokens)
    assert torch.equal(full[:, 3], tokens.mean(dim=1)) and torch.equal(full[:, 4], tokens.mean(dim=1))


@pytest.mark.parametrize("rows, fired", [(1, [1, 2, 3, 4]), (2, [2, 4]), (3, [3, 4]), (9, [4])])
def test_partial_images_come_every_k_rows_and_the_last_is_the_final_image(pipe, rows, fired):
    seen = []
    on_token = every_rows(pipe, SIZE, rows=rows, on_partial=lambda r, images: seen.append((r, images)))
    final = pipe.generate(["a red circle", "a blue square"], on_token=on_token, **OPTS)
    assert [r for r, _ in seen] == fired
    for _, images in seen:
        assert [im.size for im in images] == [(32, 64)] * 2  # PIL (width, height)
    for got, want in zip(seen[-1][1], final, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    if len(fired) > 1:  # an early partial image is not yet the final one
        assert np.abs(np.asarray(seen[0][1][0], dtype=int) - np.asarray(final[0], dtype=int)).max() > 0


def test_without_final_the_last_token_is_not_decoded(pipe):
    seen = []
    on_token = every_rows(pipe, SIZE, rows=2, on_partial=lambda r, images: seen.append(r), final=False)
    pipe.generate("a red circle", on_token=on_token, **OPTS)
    assert seen == [2]


def test_partial_decode_refuses_more_tokens_than_the_grid(pipe):
    with pytest.raises(ValueError, match="got 9 tokens for a grid of 4x2"):
        decode_partial(pipe, torch.zeros(1, 9, pipe.model.config.token_dim), SIZE)
    with pytest.raises(ValueError, match="rows .* must be > 0, got 0"):
        every_rows(pipe, SIZE, rows=0, on_partial=print)


def test_only_the_rows_begun_are_decoded_and_the_rows_below_are_flat(pipe, monkeypatch):
    """A partial image's cost shrinks with the part drawn: 3 tokens of a 4x2 grid decode 2 rows, not 4; the 2
    rows below are each image's mean colour."""
    grids = []
    decode = pipe.decode_tokens
    monkeypatch.setattr(pipe, "decode_tokens", lambda tokens, h, w: grids.append((h, w)) or decode(tokens, h, w))
    tokens = torch.randn(2, 3, pipe.model.config.token_dim)  # (B, k, D)
    images = decode_partial(pipe, tokens, SIZE)
    assert grids == [(2, 2)]
    for image in images:
        below = np.asarray(image)[SIZE[0] // 2 :]  # (H/2, W, 3): the undrawn half
        assert image.size == (32, 64) and len(np.unique(below.reshape(-1, 3), axis=0)) == 1
