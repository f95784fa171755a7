"""The checkpoint directory format (SPEC §6): config.json, single or sharded safetensors, tokenizer files,
vae/. Reads both official families unchanged and writes the same layout back, atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nextstep.io import atomic_write, write_json
from nextstep.model.config import NextStepConfig, config_to_dict, load_config
from nextstep.model.nextstep import NextStep
from nextstep.model.vae import VAEConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANTIZATION_KEY = "quantization"  # config.json entry of a `nextstep quantize` checkpoint (its mode and modules)
VAE_FILES = ("config.json", "checkpoint.pt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return path


def read_down_factor(path: str | Path) -> int:
    """Pixels per image-token side (VAE downsampling x latent patch), from the config files alone: lets a
    caller check an image size before loading any weights."""
    path = check_model_dir(path)
    vae_config = Path(path) / "vae" / VAE_FILES[0]
    if not vae_config.is_file():
        raise FileNotFoundError(f"VAE folder {vae_config.parent} has no {VAE_FILES[0]}")
    return VAEConfig.from_json(vae_config).down_factor * load_config(path / "config.json").latent_patch_size


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; an index may only name plain files inside the directory."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a 'weight_map' of names to files): {e}") from None
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{index} names the shard {name!r}; shards must be files inside {path}")
            files.append(path / name)
            if not files[-1].is_file():
                raise FileNotFoundError(f"weight shard {files[-1]} listed in {index.name} is missing")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    raise FileNotFoundError(f"model directory {path} has no {WEIGHTS_NAME} or {INDEX_NAME}")


def load_state_dict(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> dict[str, torch.Tensor]:
    state = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except SafetensorError as e:
            raise ValueError(f"cannot read {file} (truncated or not a safetensors file?): {e}") from None
    return state


def check_state_dict(model: NextStep, state: dict[str, torch.Tensor]) -> None:
    """One clear error for the first missing, unexpected or mis-shaped parameter."""
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in state:
            raise ValueError(f"checkpoint is missing parameter {name!r} (expected shape {tuple(ref.shape)})")
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ValueError(
                f"shape mismatch for parameter {name!r}: checkpoint has {tuple(state[name].shape)}, "
                f"config implies {tuple(ref.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"checkpoint has unexpected parameter {unexpected[0]!r} ({len(unexpected)} in all)")


def assign_state(model: NextStep, state: dict[str, torch.Tensor]) -> NextStep:
    """Check `state` against `model` (built on the meta device) and make its tensors the model's own, tying
    lm_head to embed_tokens where the config says so; the model in eval mode."""
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def from_pretrained(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> NextStep:
    """Load a NextStep model (either official family) from a checkpoint directory."""
    path = check_model_dir(path)
    config = load_config(path / "config.json")
    if QUANTIZATION_KEY in config.extra:
        raise ValueError(
            f"{path} holds {config.extra[QUANTIZATION_KEY].get('mode')} weights (nextstep quantize): "
            "load it with nextstep.load or Pipeline.from_pretrained"
        )
    with torch.device("meta"):
        model = NextStep(config)
    return assign_state(model, load_state_dict(path, dtype, device))


def save_pretrained(
    model: NextStep,
    path: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    vae_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write config.json, weights (sharded above max_shard_bytes, with an index), and copy the
    tokenizer files and vae/ from their source directories. Every file is written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / name, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(path / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(path / "config.json", config_to_dict(model.config))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (path / name).resolve():
                atomic_write(path / name, lambda tmp, s=src: shutil.copyfile(s, tmp))
    if vae_dir is not None and Path(vae_dir).resolve() != (path / "vae").resolve():
        (path / "vae").mkdir(exist_ok=True)
        for name in VAE_FILES:  # the official layout only: no training state
            src = Path(vae_dir) / name
            if not src.is_file():
                raise FileNotFoundError(f"VAE folder {vae_dir} has no {name}")
            atomic_write(path / "vae" / name, lambda tmp, s=src: shutil.copyfile(s, tmp))
    return path


def build_model(config: NextStepConfig, *, seed: int = 0) -> NextStep:
    """A freshly initialised model (for training from scratch and tests)."""
    torch.manual_seed(seed)
    model = NextStep(config)
    model.init_weights()
    return model
