"""Keyed training noise: standard normal statistics, and independence from how a batch is split."""

import pytest
import torch

from nextstep.train.noise import flow_noise, input_noise, keyed_normal


def test_keyed_normal_is_standard_normal_and_uncorrelated():
    keys = torch.arange(1000, dtype=torch.long)[:, None] * 7919 - 5000  # negative keys too
    counters = torch.arange(1000, dtype=torch.long)[None, :]
    x = keyed_normal(keys, counters)  # (1000, 1000)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    quantiles = torch.quantile(x.flatten()[:200_000], torch.tensor([0.025, 0.5, 0.975]))
    torch.testing.assert_close(quantiles, torch.tensor([-1.96, 0.0, 1.96]), atol=0.03, rtol=0)
    # Neighbouring counters and neighbouring keys are uncorrelated.
    for a, b in ((x[:, :-1], x[:, 1:]), (x[:-1], x[1:])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr.item()) < 0.01
    assert torch.equal(keyed_normal(keys[:3], counters[:, :5]), x[:3, :5])  # a pure function


def test_flow_noise_does_not_depend_on_the_split():
    dim, mul = 8, 3
    whole, t_whole = flow_noise([0, 1, 1, 2], [4, 2, 2, 6], dim, mul, key=(0, 5), device=torch.device("cpu"))
    assert whole.shape == (mul * 14, dim) and t_whole.shape == (mul * 14,)
    assert ((t_whole > 0) & (t_whole < 1)).all()
    parts = [
        flow_noise([0], [4], dim, mul, key=(0, 5), device=torch.device("cpu")),
        flow_noise([1, 1], [2, 2], dim, mul, key=(0, 5), device=torch.device("cpu")),
        flow_noise([2], [6], dim, mul, key=(0, 5), device=torch.device("cpu")),
    ]
    # Tiled order: batch_mul blocks, each holding every image's tokens.
    by_block = [torch.cat([p[0].reshape(mul, -1, dim)[m] for p in parts]) for m in range(mul)]
    assert torch.equal(whole, torch.cat(by_block))
    t_blocks = [torch.cat([p[1].reshape(mul, -1)[m] for p in parts]) for m in range(mul)]
    assert torch.equal(t_whole, torch.cat(t_blocks))
    other, _ = flow_noise([0, 1, 1, 2], [4, 2, 2, 6], dim, mul, key=(0, 6), device=torch.device("cpu"))
    assert not torch.equal(other, whole)
    # The two images of sample 1 differ, and the batch_mul copies of a token differ.
    blocks = whole.reshape(mul, 14, dim)
    assert not torch.equal(blocks[0, 4:6], blocks[0, 6:8]) and not torch.equal(blocks[0], blocks[1])
    empty, t_empty = flow_noise([], [], dim, mul, key=(0, 0), device=torch.device("cpu"))
    assert empty.shape == (0, dim) and t_empty.shape == (0,)


@pytest.mark.gpu
def test_flow_noise_on_cuda_matches_cpu():
    args = ([0, 1, 1, 2], [4, 2, 2, 6], 8, 3)
    cpu = flow_noise(*args, key=(1, 2), device=torch.device("cpu"))
    gpu = flow_noise(*args, key=(1, 2), device=torch.device("cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)


def test_input_noise_scales_each_image_within_bounds_and_ignores_the_split():
    dim, cpu = 16, torch.device("cpu")
    sizes = [64, 64, 64, 64, 64, 64]
    whole = input_noise([0, 1, 1, 2, 3, 4], sizes, dim, 0.8, key=(0, 3), device=cpu)
    assert whole.shape == (sum(sizes), dim)
    stds = whole.reshape(6, -1).std(1)
    assert (stds < 0.8 * 1.25).all() and stds.max() > 3 * stds.min()  # each image its own scale, bounded
    first = input_noise([0, 1, 1], sizes[:3], dim, 0.8, key=(0, 3), device=cpu)
    assert torch.equal(first, whole[: 3 * 64])  # a pure function of (key, sample, image, position)
    assert not torch.equal(input_noise([0], [64], dim, 0.8, key=(0, 4), device=cpu), whole[:64])
    assert torch.equal(input_noise([0], [64], dim, 0.0, key=(0, 3), device=cpu), torch.zeros(64, dim))
