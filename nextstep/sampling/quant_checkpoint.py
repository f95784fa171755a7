"""Quantised checkpoints: `nextstep quantize IN OUT` writes the official layout with the linears that
`apply_quantization` swaps stored as fp8/int8 weights plus one float32 scale per output channel
(`<module>.weight_scale`), named in config.json's `quantization` entry; `load_model` builds those linears as
QuantizedLinear modules straight from it, so their full-precision weights are never in memory.

    nextstep quantize path/to/NextStep-1.1 path/to/NextStep-1.1-fp8 --mode fp8 [--max-shard-mb 5120]
    pipe = nextstep.load("path/to/NextStep-1.1-fp8")
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from nextstep.args import ArgumentParser
from nextstep.io import atomic_write, write_json
from nextstep.model.checkpoint import (
    INDEX_NAME,
    QUANTIZATION_KEY,
    VAE_FILES,
    WEIGHTS_NAME,
    assign_state,
    check_model_dir,
    from_pretrained,
    load_state_dict,
    weight_files,
)
from nextstep.model.config import NextStepConfig, load_config
from nextstep.model.nextstep import NextStep
from nextstep.sampling.quantize import MODES, QuantizedLinear, apply_quantization, quantize_weight

SCALE_SUFFIX = "weight_scale"  # `<module>.weight_scale`: the (N,) float32 scale beside `<module>.weight` (N, K)
PLAN_NAME = "quantize-plan.json"  # in OUT.partial: what a resumed run must match
# Bytes per element of the safetensors dtypes an official checkpoint may hold.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def build_quantized(config: NextStepConfig, mode: str, dtype: torch.dtype) -> tuple[NextStep, list[str]]:
    """The model on the meta device with `apply_quantization`'s QuantizedLinear modules in place, and their
    names: one definition of which linears a quantised checkpoint holds."""
    with torch.device("meta"):
        model = apply_quantization(NextStep(config).to(dtype), mode)
    return model, [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def quantization_of(path: Path) -> dict | None:
    """The `quantization` entry of a checkpoint's config.json ({"mode", "modules"}), None for full precision."""
    info = load_config(path / "config.json").extra.get(QUANTIZATION_KEY)
    if info is None:
        return None
    if not isinstance(info, dict) or info.get("mode") not in MODES or not isinstance(info.get("modules"), list):
        raise ValueError(f"{path / 'config.json'}: {QUANTIZATION_KEY!r} must name a mode in {MODES} and modules")
    return info


def load_quantized(path: Path, info: dict, *, dtype: torch.dtype, device: str | torch.device) -> NextStep:
    """A model from a quantised checkpoint: quantised weights and scales as stored, the rest in `dtype`."""
    model, names = build_quantized(load_config(path / "config.json"), info["mode"], dtype)
    if sorted(names) != sorted(info["modules"]):
        extra = sorted(set(info["modules"]) ^ set(names))
        raise ValueError(f"{path} quantises other modules than this version does (first difference: {extra[0]!r})")
    weights = {f"{name}.weight" for name in names}
    state = load_state_dict(path, None, device)
    for key in list(state):
        if key.endswith(f".{SCALE_SUFFIX}"):
            state[key.removesuffix(SCALE_SUFFIX) + "scale"] = state.pop(key).float()
        elif key in weights:
            if state[key].dtype != _QDTYPE[info["mode"]]:
                raise ValueError(f"{path}: {key} is {state[key].dtype}, not the {info['mode']} its config names")
        elif state[key].is_floating_point():
            state[key] = state[key].to(dtype)
    return assign_state(model, state)


def load_model(path: str | Path, *, dtype: torch.dtype, device: str | torch.device, quantize: str = "none") -> NextStep:
    """The model of a checkpoint directory: a quantised one as stored (`quantize` none or its own mode), a
    full-precision one as `from_pretrained` loads it, then quantised at load with `quantize` fp8 | int8."""
    path = check_model_dir(path)
    info = quantization_of(path)
    if info is None:
        return apply_quantization(from_pretrained(path, dtype=dtype, device=device), quantize)
    if quantize not in ("none", info["mode"]):
        mode = info["mode"]
        raise ValueError(f"{path} holds {mode} weights: quantize must be none or {mode}, got {quantize!r}")
    return load_quantized(path, info, dtype=dtype, device=device)


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names (in order) split into shards of at most max_bytes each (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, sampling defaults and other top-level files, and the VAE, as they are."""
    for file in sorted(src.iterdir()):
        weights = file.suffix == ".safetensors" or file.name in ("config.json", INDEX_NAME)
        if file.is_file() and not file.name.startswith(".") and not weights:
            atomic_write(dst / file.name, lambda tmp, s=file: shutil.copyfile(s, tmp))
    for name in VAE_FILES:
        if (src / "vae" / name).is_file():
            atomic_write(dst / "vae" / name, lambda tmp, s=src / "vae" / name: shutil.copyfile(s, tmp))


def quantize_checkpoint(
    src: str | Path, dst: str | Path, *, mode: str = "fp8", max_shard_bytes: int = 5 * 1024**3, progress: bool = False
) -> Path:
    """Write the quantised copy of checkpoint `src` to the new directory `dst`, reading one tensor at a time.

    Everything goes to `dst.partial` first, each shard atomically, and is renamed to `dst` once complete, so
    `dst` never exists half written; rerunning after an interruption keeps the shards already written."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"the largest shard must be > 0 bytes, got {max_shard_bytes}")
    src, dst = check_model_dir(src), Path(dst)
    if dst.exists():
        raise ValueError(f"output {str(dst)!r} already exists: give a new directory")
    done = quantization_of(src)  # also validates config.json
    if done is not None:
        raise ValueError(f"{src} is already quantised ({done['mode']})")
    raw = json.loads((src / "config.json").read_text())
    _, modules = build_quantized(load_config(src / "config.json"), mode, torch.float32)
    weights = {f"{name}.weight" for name in modules}
    with ExitStack() as stack:
        files = {}  # tensor name -> open source file
        sizes = {}  # tensor name -> bytes it takes in dst
        for file in weight_files(src):
            f = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in f.keys():
                view = f.get_slice(name)
                shape, numel = view.get_shape(), int(torch.Size(view.get_shape()).numel())
                files[name] = f
                if name in weights:
                    sizes[name] = numel + 4 * shape[0]  # 1 byte per entry + a float32 scale per row
                elif view.get_dtype() in _ITEMSIZE:
                    sizes[name] = numel * _ITEMSIZE[view.get_dtype()]
                else:
                    raise ValueError(f"{file}: {name} is stored as {view.get_dtype()}, a dtype no release uses")
        missing = sorted(weights - set(files))
        if missing:
            raise ValueError(f"{src} has no {missing[0]} ({len(missing)} quantised weights missing)")
        shards = plan_shards(sizes, max_shard_bytes)
        staging = dst.with_name(f"{dst.name}.partial")
        plan = {"source": str(src.resolve()), "mode": mode, "shards": shards}
        found = staging / PLAN_NAME
        if staging.exists() and (not found.is_file() or json.loads(found.read_text()) != plan):
            raise ValueError(f"{staging} holds an interrupted run with other settings: remove it or rerun those")
        write_json(staging / PLAN_NAME, plan)
        names = shard_names(len(shards))
        bar = tqdm(total=len(files), desc=f"quantize {mode}", unit="tensor", disable=not progress)
        for shard, name in zip(shards, names, strict=True):
            if not (staging / name).is_file():
                out = {}
                for key in shard:
                    t = files[key].get_tensor(key)
                    if key in weights:
                        out[key], out[key.removesuffix("weight") + SCALE_SUFFIX] = quantize_weight(t, mode)
                    else:
                        out[key] = t.contiguous()
                atomic_write(staging / name, lambda tmp, o=out: save_file(o, tmp, metadata={"format": "pt"}))
            bar.update(len(shard))
        bar.close()
    if len(shards) > 1:
        weight_map = {}
        for shard, name in zip(shards, names, strict=True):
            for key in shard:
                weight_map[key] = name
                if key in weights:
                    weight_map[key.removesuffix("weight") + SCALE_SUFFIX] = name
        write_json(staging / INDEX_NAME, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    copy_side_files(src, staging)
    write_json(staging / "config.json", {**raw, QUANTIZATION_KEY: {"mode": mode, "modules": modules}})
    (staging / PLAN_NAME).unlink()
    os.replace(staging, dst)
    return dst


def main(argv: list[str]) -> int:
    """`nextstep quantize IN OUT`: a weight-only fp8/int8 copy of a checkpoint that loads without its bf16 weights."""
    p = ArgumentParser(prog="nextstep quantize", description=main.__doc__.split(":")[1].strip())
    p.add_argument("input", help="checkpoint directory (NextStep-1 or 1.1 layout)")
    p.add_argument("output", help="new directory to write (must not exist)")
    p.add_argument("--mode", choices=MODES, default="fp8", help="weight format: fp8 (e4m3) or int8")
    p.add_argument("--max-shard-mb", type=int, default=5120, help="largest safetensors shard written, in MiB")
    args = p.parse_args(argv)
    if args.max_shard_mb <= 0:
        p.error(f"--max-shard-mb must be > 0, got {args.max_shard_mb}")
    shard = args.max_shard_mb << 20
    print(quantize_checkpoint(args.input, args.output, mode=args.mode, max_shard_bytes=shard, progress=True))
    return 0
