"""Training data configuration: the dataset mixture and everything that decides which samples come out, in
which order and shape (`DataConfig`, part of `TrainConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nextstep.data.buckets import make_buckets


@dataclass
class DatasetSpec:
    """One dataset of the mixture."""

    # Shards: local paths, directories (all *.tar inside), brace patterns "data-{000000..000099}.tar",
    # fsspec URLs ("s3://b/x-{0..9}.tar") or "pipe:<command writing the tar to stdout>"; str or list.
    shards: str | list[str] = ""
    weight: float = 1.0  # relative probability of drawing from this dataset
    name: str = ""  # label in logs and stats; defaults to "dataset<i>"

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"dataset {self.name!r}: weight must be positive and finite, got {self.weight}")
        if not self.shards:
            raise ValueError(f"dataset {self.name!r}: shards is empty")


@dataclass
class DataConfig:
    """Everything that decides which samples come out, in which order and shape."""

    datasets: list[DatasetSpec] = field(default_factory=list)  # the mixture; dicts are converted
    image_size: int = 256  # buckets hold about image_size**2 pixels; official stages: 256, then 512
    # Aspect ratios (W/H) of the resolution buckets; images go to the bucket of nearest log-ratio.
    aspect_ratios: tuple[float, ...] = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
    buckets: list[tuple[int, int]] | None = None  # explicit (H, W) buckets; None derives them from above
    bucket_multiple: int = 16  # bucket sides are multiples of this (VAE stride 8 x patch 2)
    batch_size: int = 8  # samples per batch, per rank; every batch holds one bucket
    caption_drop_prob: float = 0.1  # chance a sample's caption text becomes "" (CFG); placeholders stay
    shuffle_buffer: int = 500  # samples mixed per worker slot across shard boundaries; 0 disables
    loop: bool = True  # True: endless stream, each dataset restarts with a new epoch when exhausted;
    # False: one epoch of every dataset (set_epoch picks which), then partial batches are flushed
    num_workers: int = 4  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # batches prefetched per worker
    seed: int = 0  # base seed of every random choice in the pipeline

    def __post_init__(self) -> None:
        self.datasets = [
            DatasetSpec(**d) if isinstance(d, dict) else d for d in self.datasets
        ]  # JSON-loaded configs arrive as dicts
        for i, spec in enumerate(self.datasets):
            spec.name = spec.name or f"dataset{i}"
        if self.image_size % self.bucket_multiple:
            raise ValueError(f"image_size must be a multiple of {self.bucket_multiple}, got {self.image_size}")
        if not 0 <= self.caption_drop_prob <= 1:
            raise ValueError(f"caption_drop_prob must be in [0, 1], got {self.caption_drop_prob}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 0; got "
                f"{self.batch_size}, {self.num_workers}, {self.shuffle_buffer}"
            )
        if self.buckets is not None:
            self.buckets = [tuple(b) for b in self.buckets]
            bad = [b for b in self.buckets if b[0] % self.bucket_multiple or b[1] % self.bucket_multiple]
            if bad or not self.buckets:
                raise ValueError(f"buckets must be non-empty (H, W) multiples of {self.bucket_multiple}: {bad}")

    def resolved_buckets(self) -> list[tuple[int, int]]:
        """The (H, W) buckets in use."""
        return self.buckets or make_buckets(self.image_size, self.aspect_ratios, multiple=self.bucket_multiple)
