"""Model initialisation for training: the architecture from the config and tokenizer, the weights (random,
a pretrained NextStep checkpoint or a Qwen2-style LM backbone), and which parameters train."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from nextstep.model.checkpoint import build_model, from_pretrained, load_state_dict, weight_files
from nextstep.model.config import NextStepConfig
from nextstep.model.nextstep import NextStep
from nextstep.model.tokenizer import BOI, EOI, IMAGE_PLACEHOLDER, PAD, TextTokenizer
from nextstep.train.config import TrainConfig

log = logging.getLogger(__name__)


def resolve_arch(cfg: TrainConfig, tokenizer: TextTokenizer | None) -> NextStepConfig:
    """The model hyper-parameters: config.json for pretrained inits, else `model.arch` with the
    vocabulary size and special-token ids taken from the tokenizer."""
    m = cfg.model
    if m.init == "pretrained":
        from nextstep.model.config import load_config

        return load_config(Path(m.path) / "config.json")
    arch = m.arch
    if tokenizer is not None and m.vocab_multiple:
        arch.vocab_size = -(-len(tokenizer) // m.vocab_multiple) * m.vocab_multiple
        arch.boi, arch.eoi = tokenizer.token_id(BOI), tokenizer.token_id(EOI)
        arch.image_placeholder_id = tokenizer.token_id(IMAGE_PLACEHOLDER)
        arch.pad_token_id_added = tokenizer.token_id(PAD)
    return arch


def load_lm_backbone(model: NextStep, path: str | Path) -> None:
    """Backbone weights from a Qwen2-style HF LM directory (`model.`-prefixed names); image modules
    keep their fresh init. A smaller LM vocabulary fills the first rows of the embeddings."""
    state = load_state_dict(Path(path), torch.float32, "cpu")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "lm_head.weight" not in state:  # tied LMs store only the embeddings
        state["lm_head.weight"] = state["embed_tokens.weight"]
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(("image_", "gen_pos_embed"))]
    with torch.no_grad():
        for name in backbone:
            if name not in state:
                raise ValueError(f"LM checkpoint {path} is missing parameter {name!r}")
            src, dst = state[name], own[name]
            vocab_rows = name in ("embed_tokens.weight", "lm_head.weight") and src.shape[1:] == dst.shape[1:]
            if vocab_rows and src.shape[0] <= dst.shape[0]:
                dst[: src.shape[0]].copy_(src)
            elif src.shape != dst.shape:
                raise ValueError(
                    f"LM parameter {name!r} has shape {tuple(src.shape)}, model.arch implies {tuple(dst.shape)}"
                )
            else:
                dst.copy_(src)
    log.info("initialised the backbone from LM %s (%d files)", path, len(weight_files(Path(path))))


def init_model(cfg: TrainConfig, arch: NextStepConfig) -> NextStep:
    """The model of `model.init`: a pretrained checkpoint, or `arch` from the training seed (with an LM's
    backbone weights for init=lm)."""
    if cfg.model.init == "pretrained":
        model = from_pretrained(cfg.model.path)
        model.train()
        return model
    model = build_model(arch, seed=cfg.training.seed)
    if cfg.model.init == "lm":
        load_lm_backbone(model, cfg.model.path)
    return model


def set_trainable(model: nn.Module, prefixes: list[str]) -> None:
    """Freeze everything outside `prefixes` ([] keeps all trainable)."""
    if not prefixes:
        return
    params = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(n == p or n.startswith(p + ".") for n in params):
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"training.train_modules entry {p!r} names no module or parameter (top level: {top})")
    for name, p in model.named_parameters():
        p.requires_grad = any(name == m or name.startswith(m + ".") for m in prefixes)
