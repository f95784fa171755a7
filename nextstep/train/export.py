"""Training checkpoint -> the official directory format (what the official zero_to_fp32 step gives):
config.json + safetensors + tokenizer files + vae/, loadable with `from_pretrained`.

    nextstep export runs/shapes/checkpoints/step-00001000 exported/shapes
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

from nextstep.args import ArgumentParser
from nextstep.io import write_json
from nextstep.model.checkpoint import save_pretrained
from nextstep.model.nextstep import NextStep
from nextstep.sampling.pipeline import DEFAULTS_FILE
from nextstep.train import checkpoint as ckpt
from nextstep.train.config import TrainConfig, load_json
from nextstep.train.lora import apply_lora, merge_lora
from nextstep.train.parallel import DTYPE

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run / checkpoints directory (its newest step)."""
    path = Path(path)
    if (path / ckpt.META_NAME).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = ckpt.latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no training checkpoint at {path} (expected step-XXXXXXXX/ with {ckpt.META_NAME})")


def sampling_defaults(cfg: TrainConfig) -> dict:
    """The run's sampling_defaults.json: the training bucket nearest to square as the default size, the head
    steps and guidance of the run's own samples, and every size it trained at (pipeline warnings)."""
    buckets = cfg.data.resolved_buckets()  # (H, W)
    h, w = min(buckets, key=lambda b: abs(math.log(b[1] / b[0])))
    return {
        "size": [h, w],
        "steps": cfg.logging.sample_head_steps,
        "cfg": cfg.logging.sample_cfg,
        "trained": {"sizes": [list(b) for b in buckets]},
    }


def export(path: str | Path, out: str | Path, *, dtype: str = "float32", max_shard_mb: float = 5120) -> Path:
    """Write the official format of checkpoint `path` to `out`, with the run's sampling_defaults.json; LoRA
    adapters are merged first. Weights above `max_shard_mb` (MB = 1e6 bytes) are split into shards with an
    index, as the official release is."""
    if max_shard_mb <= 0:
        raise ValueError(f"max_shard_mb must be > 0, got {max_shard_mb}")
    path = resolve_checkpoint(path)
    cfg = load_json(path / ckpt.CONFIG_NAME)
    with torch.device("meta"):
        model = NextStep(cfg.model.arch)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    model.to_empty(device="cpu")
    ckpt.load_model_weights(path, model)
    if cfg.lora.enabled:
        merge_lora(model)
    model.to(DTYPE[dtype])
    vae_dir = cfg.model.resolved_vae_dir
    out = save_pretrained(
        model,
        out,
        tokenizer_dir=cfg.model.resolved_tokenizer_dir or None,
        vae_dir=vae_dir if vae_dir and Path(vae_dir).is_dir() else None,
        max_shard_bytes=int(max_shard_mb * 1e6),
    )
    write_json(out / DEFAULTS_FILE, sampling_defaults(cfg))
    log.info("exported %s -> %s", path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`nextstep export CKPT OUT [--dtype bfloat16] [--max-shard-mb 5000]`."""
    parser = ArgumentParser(prog="nextstep export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="step-XXXXXXXX directory, or a run directory (newest step)")
    parser.add_argument("out", help="output directory (official format)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE), help="weight dtype written")
    parser.add_argument("--max-shard-mb", type=float, default=5120, help="largest weight file (MB); more: shards")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(args.checkpoint, args.out, dtype=args.dtype, max_shard_mb=args.max_shard_mb)
    except (ValueError, FileNotFoundError) as e:
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2
    return 0
