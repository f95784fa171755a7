"""The rollout policy of RL post-training: a plain copy of the trained model (unsharded, adapters merged) with
its pipeline and engine, built at the first step and refreshed in place at every later one, so the engine's
KV caches and CUDA graphs are made once per run, not once per step."""

from __future__ import annotations

import gc

import torch
from torch import nn

from nextstep.model.tokenizer import TextTokenizer
from nextstep.model.vae import AutoEncoder
from nextstep.sampling.engine import Engine
from nextstep.sampling.pipeline import Pipeline
from nextstep.train.config import TrainConfig
from nextstep.train.metrics import sampling_copy


class RolloutPolicy:
    """`update(model)` before each step's rollouts, then sample with `pipe` and `engine`.

    keep_states: engine states (KV cache and CUDA graphs each) kept across steps, one per set of trained head
    steps; 0 builds the copy anew at every update and `release` frees it before the policy update, for models
    where the copy and its cache do not fit beside training.
    """

    def __init__(self, vae: AutoEncoder, tokenizer: TextTokenizer, *, defaults: dict, keep_states: int) -> None:
        self.vae, self.tokenizer, self.defaults, self.keep_states = vae, tokenizer, defaults, keep_states
        self.pipe: Pipeline | None = None
        self.engine: Engine | None = None

    def update(self, model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        """Make the copy hold `model`'s current weights. Collective under FSDP: every rank gathers them."""
        dtype = next(self.vae.parameters()).dtype
        if self.pipe is None:
            copy = sampling_copy(model, cfg, dtype, device, every_rank=True)
            self.pipe = Pipeline(copy, self.vae, self.tokenizer, defaults=dict(self.defaults))
            self.engine = Engine(copy, max_states=max(self.keep_states, 1))
            return
        if cfg.lora.enabled:  # merged weights exist only in a merged copy
            state = sampling_copy(model, cfg, dtype, device, every_rank=True).state_dict()
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        self.pipe.model.load_state_dict(state, strict=True)  # copy_ into the same parameters, cast to dtype
        self.engine.refresh()

    def release(self) -> None:
        """Free the copy, its engine and caches unless they are kept (keep_states > 0)."""
        if self.keep_states > 0:
            return
        self.pipe = self.engine = None
        gc.collect()  # the engine's state and its CUDA graphs form a cycle that holds the copy and the KV cache
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
