"""LoRA fine-tuning of the backbone with peft: adapters on the decoder linears, the image path trained
fully, and merge-back so the exported checkpoint has the plain official parameter names."""

from __future__ import annotations

import logging

from torch import nn

from nextstep.train.config import LoraConfig

log = logging.getLogger(__name__)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Inject adapters into `model.layers` in place; only adapters and `cfg.full_modules` train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        # Only decoder layers: the flow head's linears must not match names like "linear".
        layers_to_transform=list(range(len(model.layers))),
        layers_pattern="layers",
    )
    inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or any(name.startswith(m) for m in cfg.full_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %.2fM trainable parameters", cfg.rank, cfg.target_modules, trainable / 1e6)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear and put the base linear back in its place."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)
                setattr(parent, child_name, child.get_base_layer())
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())
