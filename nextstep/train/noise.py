"""Flow-matching noise for training, as a pure function of (run seed, step, sample, image, position).

The noise of an image must not depend on how a global batch is split over ranks and micro-batches, or on
whether the run was resumed, so it cannot come from one stateful generator. A counter-based generator
(a 32-bit integer hash of key and counter, then Box-Muller) gives every value from its coordinates in a
handful of elementwise kernels for the whole batch; the hash bits are the same on CPU and GPU, the normals
equal up to the last-bit rounding of log/cos on each device.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32  # int64 products wrap; the low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _uniform(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """U(0, 1) float32 from 24 hash bits, never 0 or 1."""
    bits = _mix32((key + _mix32(counter & _M32)) & _M32) >> 8
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def keyed_normal(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 values, one per (key, counter) pair; int64 tensors of one (broadcast) shape,
    keys any int64, counters in [0, 2**31)."""
    k = _mix32((key & _M32) ^ _mix32((key >> 32) & _M32))
    u1, u2 = _uniform(k, 2 * counter), _uniform(k, 2 * counter + 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)


def key_seed(*parts: Any) -> int:
    """A 63-bit key from any repr-able parts."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def flow_noise(
    image_sample: list[int],
    image_tokens: list[int],
    token_dim: int,
    batch_mul: int,
    *,
    key: tuple,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and t for the flow head. Image i (of sample `image_sample[i]`, with `image_tokens[i]` tokens)
    is keyed by (key, sample, its number within the sample). Returned in the head's tiled order
    (batch_mul outermost, then images, then tokens): (batch_mul * N, D) and (batch_mul * N,)."""
    seen: dict[int, int] = {}
    keys = []
    for sample in image_sample:
        k = seen[sample] = seen.get(sample, -1) + 1
        keys.append(key_seed(*key, sample, k))
    counts = torch.tensor(image_tokens, dtype=torch.long, device=device)
    n = int(sum(image_tokens))
    img = torch.repeat_interleave(torch.arange(len(keys), device=device), counts, output_size=n)  # (N,)
    first = torch.cumsum(counts, 0) - counts
    token = torch.arange(n, device=device) - first[img]  # (N,) position inside its image
    m = torch.arange(batch_mul, device=device)[:, None]  # (batch_mul, 1)
    row = (m * counts[img] + token).reshape(batch_mul, n)  # (batch_mul, N) draw number inside the image
    row_key = torch.tensor(keys, dtype=torch.long, device=device)[img].expand(batch_mul, n)
    j = torch.arange(token_dim + 1, device=device)  # D noise values, then the normal behind t
    values = keyed_normal(row_key[..., None], row[..., None] * (token_dim + 1) + j)  # (batch_mul, N, D + 1)
    values = values.reshape(batch_mul * n, token_dim + 1)
    return values[:, :token_dim].contiguous(), torch.sigmoid(values[:, token_dim])


def input_noise(
    image_sample: list[int],
    image_tokens: list[int],
    token_dim: int,
    max_std: float,
    *,
    key: tuple,
    device: torch.device,
) -> torch.Tensor:
    """Noise (N, D) for the backbone's image-token inputs (the flow head's targets stay clean), keyed like
    `flow_noise`. Every image draws its own standard deviation uniformly from [0, max_std], so some
    contexts are nearly clean, as at inference, and others force the model to read the text."""
    eps, _ = flow_noise(image_sample, image_tokens, token_dim, 1, key=(*key, "inputs"), device=device)
    z, _ = flow_noise(image_sample, [1] * len(image_tokens), 1, 1, key=(*key, "input-std"), device=device)
    std = max_std * 0.5 * (1 + torch.erf(z[:, 0] / math.sqrt(2)))  # (images,), normal CDF -> uniform
    counts = torch.tensor(image_tokens, dtype=torch.long, device=device)
    return eps * torch.repeat_interleave(std, counts, output_size=eps.shape[0])[:, None]
