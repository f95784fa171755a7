"""Model hyper-parameters and the config.json format of both official NextStep families.

NextStep-1 (`model_type: "nextstep"`, a LlamaConfig subclass) and NextStep-1.1
(`model_type: "stepx_llama"`, a Qwen2Config subclass) serialise different keys; this
module maps both onto one dataclass and writes each back in its own dialect.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Family = Literal["nextstep1", "nextstep11"]

# Keys Hugging Face writes for bookkeeping; kept verbatim so a round trip is lossless,
# but they do not change the model.
HF_BOOKKEEPING_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "use_cache",
        "initializer_range",
        "pretraining_tp",
        "attention_dropout",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "max_window_layers",
        "use_sliding_window",
        "sliding_window",
        "layer_types",
        "vae_name_or_path",
        "quantization",  # `nextstep quantize`'s weight format (nextstep/sampling/quant_checkpoint.py)
        "latent_size",
        "image_size",
        "genloss_type",
        "genloss_num_sampling_steps",
        "create_kwargs",
        "rope_scaling",
        "tie_word_embeddings",
        "model_type",
    }
)

# Alternative names used by the public NextStep-1.1 Hugging Face config for our fields.
KEY_ALIASES = {
    "genloss_width": "fm_head_dim",
    "genloss_depth": "fm_head_layers",
    "genloss_batch_mul": "fm_head_batch_mul",
    "num_channels": "latent_channels",
    "patch_size": "latent_patch_size",
    "image_loss_weight": "im_loss_weight",
}

REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "boi",
    "eoi",
    "image_placeholder_id",
)


@dataclass
class NextStepConfig:
    vocab_size: int = 448  # rows of embed_tokens / lm_head (tokenizer size padded up)
    hidden_size: int = 64  # backbone width
    intermediate_size: int = 128  # SwiGLU inner width
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads H
    num_key_value_heads: int = 2  # key/value heads Hkv (GQA)
    head_dim: int | None = None  # per-head width D; None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 1e6  # RoPE base
    max_position_embeddings: int = 4096  # longest sequence the model is meant for
    attention_bias: bool = True  # q/k/v projections carry a bias (always true for Qwen2)
    o_attention_bias: bool = False  # o_proj carries a bias
    mlp_bias: bool = False  # gate/up/down projections carry a bias
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    # image tokens
    latent_channels: int = 16  # VAE latent channels C
    latent_patch_size: int = 2  # latent patch side; a token has C * p * p features
    use_gen_pos_embed: bool = False  # NextStep-1 2-D sin-cos table on the head condition (off in releases)
    base_image_grid_size: int = 32  # side of the gen_pos_embed table (NextStep-1 only)
    # flow-matching head
    fm_head_dim: int = 64  # head MLP width (1536 in the release)
    fm_head_layers: int = 2  # residual adaLN blocks (12 in the release)
    fm_head_batch_mul: int = 4  # noise/t draws per condition in training
    # loss weights
    lm_loss_weight: float = 0.01  # weight of text cross-entropy
    im_loss_weight: float = 1.0  # weight of the flow-matching loss
    # special token ids
    boi: int = 405  # <|begin_of_image|>
    eoi: int = 406  # <|end_of_image|>
    image_placeholder_id: int = 407  # <|image_placeholder|>, replaced by image tokens
    pad_token_id_added: int = 401  # [PAD], used for left padding
    # which official code dialect config.json and sampling follow
    family: Family = "nextstep11"
    # HF bookkeeping keys kept verbatim for lossless round trips
    extra: dict[str, Any] = field(default_factory=dict)
    # model keys config.json held, so family-optional keys are written back only if they were read
    source_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.family not in ("nextstep1", "nextstep11"):
            raise ValueError(f"unknown model family {self.family!r}")
        if self.use_gen_pos_embed:
            raise ValueError(
                "use_gen_pos_embed=true is not supported: every official release has it off "
                "and its placement is not pinned by a reference"
            )

    @property
    def token_dim(self) -> int:
        """Features of one image token: C * p * p."""
        return self.latent_channels * self.latent_patch_size**2

    @property
    def num_params_estimate(self) -> int:
        d, f, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        layer = d * (d + 2 * kv) + d * d + 3 * d * f
        return n * layer + 2 * self.vocab_size * d


_FIELDS = {f.name for f in dataclasses.fields(NextStepConfig)} - {"family", "extra", "source_keys"}
# Fields the NextStep-1.1 (Qwen2Config) dialect does not write unless the source had them.
_NEXTSTEP11_OPTIONAL = {"attention_bias", "mlp_bias", "head_dim", "use_gen_pos_embed", "base_image_grid_size"}


def detect_family(raw: dict[str, Any]) -> Family:
    """NextStep-1 configs are LlamaConfig dumps (model_type "nextstep", `attention_bias` key);
    NextStep-1.1 configs are Qwen2Config dumps (model_type "stepx_llama")."""
    if raw.get("model_type") == "nextstep" or "use_gen_pos_embed" in raw or "attention_bias" in raw:
        return "nextstep1"
    return "nextstep11"


def config_from_dict(raw: dict[str, Any]) -> NextStepConfig:
    """Parse a config.json dict of either family; unknown or missing keys are errors."""
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ValueError(f"config.json is missing required key(s): {', '.join(missing)}")
    kwargs: dict[str, Any] = {"family": detect_family(raw), "extra": {}}
    source_keys = []
    for key, value in raw.items():
        name = KEY_ALIASES.get(key, key)
        if name in _FIELDS:
            kwargs[name] = value
            source_keys.append(name)
        elif key in HF_BOOKKEEPING_KEYS:
            kwargs["extra"][key] = value
        else:
            raise ValueError(f"unknown config key {key!r} in config.json")
    if "tie_word_embeddings" in raw:
        kwargs["tie_word_embeddings"] = bool(raw["tie_word_embeddings"])
        kwargs["extra"].pop("tie_word_embeddings", None)
    if raw.get("rope_scaling") not in (None, {}):
        raise ValueError(f"rope_scaling {raw['rope_scaling']!r} is not supported (releases use none)")
    return NextStepConfig(**kwargs, source_keys=tuple(source_keys))


def config_to_dict(cfg: NextStepConfig) -> dict[str, Any]:
    """Serialise in the family's own dialect (the keys its official code reads)."""
    out: dict[str, Any] = dict(cfg.extra)
    skip = {"family", "extra", "source_keys"}
    if cfg.family == "nextstep11":
        # Qwen2Config has no attention_bias/mlp_bias/head_dim/gen-pos keys.
        skip |= _NEXTSTEP11_OPTIONAL - set(cfg.source_keys)
        out.setdefault("model_type", "stepx_llama")
    else:
        out.setdefault("model_type", "nextstep")
    for f in dataclasses.fields(cfg):
        if f.name not in skip:
            out[f.name] = getattr(cfg, f.name)
    return dict(sorted(out.items()))


def load_config(path: str | Path) -> NextStepConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config_from_dict(raw)
