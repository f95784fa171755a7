"""Collated training batches for one rank, from the wds.py loader or from a given iterable of Sample lists,
with the loader position for checkpoints."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

from nextstep.model.tokenizer import TextTokenizer
from nextstep.train.config import TrainConfig
from nextstep.train.sequences import SequenceBuilder, TrainBatch, collate, special_ids


class BatchStream:
    """Collated TrainBatches for this rank, from wds.py (tokenized and collated in the loader workers) or
    from a given iterable of Sample lists; `state_dict` is the loader position after the last batch taken."""

    def __init__(self, cfg: TrainConfig, builder: SequenceBuilder, collate_fn, rank: int, world: int, data=None):
        self.builder, self.collate_fn = builder, collate_fn
        self.loader = None
        if data is None:
            from nextstep.data.wds import build_dataloader

            self.loader = build_dataloader(
                cfg.data, rank=rank, world_size=world, tokenizer_fn=builder, collate=collate_fn
            )
            self.source: Iterable = self.loader
        else:
            self.source = data
        self._it: Iterator | None = None

    def next(self) -> TrainBatch:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.source)
            try:
                batch = next(self._it)
                break
            except StopIteration:  # one-pass loaders start their next epoch
                self._it = None
        else:
            raise ValueError(f"the data gave no batch in a whole pass: no readable samples? (stats: {self.stats()})")
        if not isinstance(batch, TrainBatch):
            batch = self.collate_fn([self.builder(s) for s in batch])
        return batch

    def state_dict(self) -> dict | None:
        return self.loader.state_dict() if self.loader is not None else None

    def load_state_dict(self, state: dict | None, *, elastic: bool = False) -> bool:
        """Restore the loader position; False when it was saved with another worker layout and `elastic`
        lets the caller restart the data instead (`restart_after`)."""
        if self.loader is not None and state is not None:
            try:
                self.loader.load_state_dict(state)
            except ValueError as e:
                if not elastic:
                    raise ValueError(f"{e} (training.elastic_resume=true restarts the data at the next epoch)") from e
                return False
            self._it = None
        return True

    def restart_after(self, state: dict | None) -> int | None:
        """Elastic resume: the loader starts the epoch after the one `state` reached (None: no loader)."""
        if self.loader is None or state is None:
            return None
        self._it = None
        return self.loader.restart_after(state)

    def stats(self) -> dict:
        return self.loader.stats() if self.loader is not None else {}


def build_batches(
    cfg: TrainConfig,
    tokenizer: TextTokenizer,
    *,
    down_factor: int,
    pixels: bool,
    rank: int,
    world: int,
    data: Iterable | None = None,
) -> BatchStream:
    """The batch stream of `cfg` for this rank: images are `down_factor` pixels (or latent cells) per token
    side, pixels (3 channels) or precomputed latents (`model.arch.latent_channels`)."""
    arch, t_cfg = cfg.model.arch, cfg.training
    ids = special_ids(tokenizer, arch.boi, arch.eoi, arch.image_placeholder_id, arch.pad_token_id_added)
    builder = SequenceBuilder(
        tokenizer,
        ids,
        down_factor=down_factor,
        max_len=t_cfg.max_seq_len,
        add_eos=t_cfg.add_eos,
        channels=3 if pixels else arch.latent_channels,
    )
    collate_fn = functools.partial(
        collate, ids=ids, max_len=t_cfg.max_seq_len, pack=t_cfg.pack, pad_to_multiple=t_cfg.pad_to_multiple
    )
    return BatchStream(cfg, builder, collate_fn, rank, world, data)
