"""The training config tree (model / data / training / optim / parallel / lora / logging / checkpoint / rl),
dotted command-line overrides (`training.max_steps=1000`), preset loading, and show/diff.

    nextstep config show debug
    nextstep config diff configs/nextstep_qwen14b_256px.py configs/nextstep_qwen14b_512px.py
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextstep.args import ArgumentParser
from nextstep.data.config import DataConfig
from nextstep.model.config import NextStepConfig

INIT_KINDS = ("scratch", "pretrained", "lm")
DTYPES = ("float32", "bfloat16", "float16")
MODES = ("sft", "rl")


@dataclass
class ModelConfig:
    # scratch: fresh weights from `arch`; pretrained: an official NextStep directory (config.json there
    # wins over `arch`); lm: a Qwen2-style HF LM directory (`model.`-prefixed safetensors) for the backbone,
    # image modules initialised fresh.
    init: str = "scratch"
    path: str = ""  # checkpoint directory for init=pretrained / init=lm
    tokenizer_dir: str = ""  # directory with tokenizer.json; "" uses `path`
    vae_dir: str = ""  # official VAE directory (config.json + checkpoint.pt); "" uses `path`/vae
    # With a tokenizer: vocab_size = tokenizer size rounded up to this multiple and special-token ids
    # (boi, eoi, placeholder, pad) read from it; 0 keeps `arch` as written.
    vocab_multiple: int = 64
    arch: NextStepConfig = field(default_factory=NextStepConfig)  # hyper-parameters (scratch / lm)
    precomputed_latents: bool = False  # batches already hold VAE latents (no VAE encode in the step)

    def __post_init__(self) -> None:
        if isinstance(self.arch, dict):
            self.arch = NextStepConfig(**self.arch)
        if self.init not in INIT_KINDS:
            raise ValueError(f"model.init must be one of {INIT_KINDS}, got {self.init!r}")
        if self.init != "scratch" and not self.path:
            raise ValueError(f"model.init={self.init!r} needs model.path")
        if self.vocab_multiple < 0:
            raise ValueError(f"model.vocab_multiple must be >= 0, got {self.vocab_multiple}")

    @property
    def resolved_tokenizer_dir(self) -> str:
        return self.tokenizer_dir or self.path

    @property
    def resolved_vae_dir(self) -> str:
        return self.vae_dir or (str(Path(self.path) / "vae") if self.path else "")


@dataclass
class TrainingConfig:
    # sft: the NextStep objective on `data`; rl: flow-based RL post-training on rollouts (the `rl` section, no data)
    mode: str = "sft"
    output_dir: str = "runs/debug"  # run directory: config.json, metrics.jsonl, checkpoints/, samples/
    max_steps: int = 1000  # optimizer steps in the whole run (also the cosine schedule length)
    save_steps: int = 500  # checkpoint every this many optimizer steps (0: only at the end)
    resume: bool = False  # continue from the newest checkpoint in output_dir/checkpoints
    # Resume with another world size or data.num_workers: model, optimizer and schedule are restored, the data
    # restarts at the next epoch (not an exact continuation). False: such a resume is refused.
    elastic_resume: bool = False
    seed: int = 0  # seed of weights, flow-matching noise and the data order
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 2048  # tokens per row; longer samples lose their tail (whole image blocks)
    pack: bool = False  # pack several samples per row (block-diagonal attention, per-sample positions)
    pad_to_multiple: int = 64  # pad row length up to a multiple (fewer compiled shapes)
    add_eos: bool = True  # end every sample with <|endoftext|>
    train_modules: list[str] = field(default_factory=list)  # name prefixes to train; [] trains all
    deterministic: bool = False  # torch.use_deterministic_algorithms (tests, debugging)
    # Gaussian noise on the image tokens the backbone reads (the flow head's targets stay clean): each image
    # draws its std uniformly from [0, image_input_noise]. Noisy context makes the next token depend more on
    # the text; inference reads clean tokens. 0 = off (the official recipe).
    image_input_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"training.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("max_steps", "grad_accum_steps", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.image_input_noise <= 10:
            raise ValueError(f"training.image_input_noise must be in [0, 10], got {self.image_input_noise}")
        if self.save_steps < 0 or self.pad_to_multiple < 1:
            raise ValueError(
                f"training.save_steps must be >= 0 and pad_to_multiple >= 1, got "
                f"{self.save_steps}, {self.pad_to_multiple}"
            )


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate of AdamW
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    warmup_steps: int = 100  # linear warm-up steps from 0
    schedule: str = "cosine"  # cosine | constant | wsd (after warm-up)
    # wsd (warm-up, stable, decay): constant, then linear down to min_lr_ratio over the last decay_steps.
    # The stable phase does not depend on max_steps, so a run may be lengthened when resumed.
    decay_steps: int = 0
    weight_decay: float = 0.1  # decoupled decay; not applied to biases and norms (ndim < 2)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    module_lr: dict[str, float] = field(default_factory=dict)  # name prefix -> lr multiplier

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"optim needs lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got "
                f"{self.lr}, {self.warmup_steps}, {self.min_lr_ratio}"
            )
        if self.schedule not in ("cosine", "constant", "wsd"):
            raise ValueError(f"optim.schedule must be cosine, constant or wsd, got {self.schedule!r}")
        if self.decay_steps < 0:
            raise ValueError(f"optim.decay_steps must be >= 0, got {self.decay_steps}")


@dataclass
class ParallelConfig:
    fsdp: bool = True  # shard with FSDP2 when more than one process runs
    param_dtype: str = "bfloat16"  # compute dtype of parameters (FSDP2 / autocast); masters stay fp32
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True  # free gathered layers after forward (ZeRO-3); False: ZeRO-2-like
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    compile: bool = False  # torch.compile each decoder layer
    backend: str = ""  # process-group backend; "" picks nccl on CUDA, gloo on CPU

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"parallel.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")


@dataclass
class LoraConfig:
    enabled: bool = False  # train LoRA adapters on the backbone (peft); base weights frozen
    rank: int = 16  # adapter rank r
    alpha: float = 32.0  # adapter scale numerator (scale = alpha / rank)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # backbone linear names that get adapters
    # Modules trained fully next to the adapters (the image path is new to a text LM).
    full_modules: list[str] = field(default_factory=lambda: ["image_in_projector", "image_out_projector", "image_head"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")


@dataclass
class LoggingConfig:
    log_steps: int = 10  # write metrics every this many steps
    progress: bool = True  # tqdm bar on rank 0
    wandb: bool = False  # log to Weights & Biases (offline without WANDB_API_KEY)
    wandb_project: str = "nextstep"  # W&B project
    run_name: str = ""  # W&B / TensorBoard run name; "" uses the output_dir name
    tensorboard: bool = False  # write TensorBoard events under output_dir/tb
    sample_steps: int = 0  # save sample images every this many steps; 0 disables
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle on a blue background"])
    sample_size: int = 256  # sample image side in pixels
    sample_head_steps: int = 20  # flow-matching head steps for samples
    sample_cfg: float = 4.0  # guidance scale for samples
    peak_tflops: float = 0.0  # accelerator bf16 dense peak for MFU; 0 reads it from the device name
    profile_steps: int = 0  # torch.profiler over this many steps after 5 warm-up steps; table + trace in output_dir

    def __post_init__(self) -> None:
        if self.log_steps < 1 or self.sample_steps < 0 or self.profile_steps < 0:
            raise ValueError(
                "logging.log_steps must be >= 1, sample_steps and profile_steps >= 0, got "
                f"{self.log_steps}, {self.sample_steps}, {self.profile_steps}"
            )


@dataclass
class CheckpointConfig:
    keep_last: int = 3  # checkpoints kept; older ones are deleted after a successful save
    export_final: bool = False  # also write the official directory format at the end

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class RLConfig:
    """Flow-based RL post-training (training.mode=rl), NextStep-1.1's recipe: Flow-GRPO on the flow head's steps."""

    group_size: int = 8  # G images per prompt; advantages are relative to the group
    prompts_per_step: int = 4  # prompts per process and optimizer step (G images each)
    # Prompt source: "shapes" (nextstep.rl.prompts.rl_prompts, split "in": never a held-out composition) or
    # "file:PATH" (one prompt per line, no reward metadata).
    prompts: str = "shapes"
    prompt_pool: int = 4096  # shapes prompts drawn once (seeded); each step picks prompts_per_step of them
    # Share of each step's prompt groups that are edits (prompts "shapes" only): an in-distribution scene rendered
    # as the input image and an instruction from the trained edit templates (nextstep.rl.prompts.rl_edit_prompts).
    edit_fraction: float = 0.0
    reward: str = "shapes"  # shapes | shapes_partial | brightness | clip_preference | module:function
    reward_model_dir: str = ""  # local model directory of the clip_preference reward
    image_size: int = 128  # rollout image side in pixels
    head_steps: int = 20  # flow-head steps per token while sampling
    shift: float = 1.0  # timestep shift of the head's schedule
    rule: str = "sde"  # stochastic NextStep-1.1 rule of the trained steps: sde | cps
    noise_level: float = 0.8  # SDE/CPS noise scale
    # Candidate head steps to train (0 = the first, from noise); each step trains steps_per_rollout of them, drawn
    # from (seed, step). The other head steps are deterministic (ODE). Later steps carry little noise.
    train_steps: list[int] = field(default_factory=lambda: list(range(10)))
    steps_per_rollout: int = 2  # trained (stochastic) head steps per rollout; 0 trains all of train_steps
    clip: float = 0.2  # PPO clip range of the policy ratio (one update per rollout: the ratio stays ~1)
    kl_weight: float = 0.0  # weight of the KL term to the frozen starting model (0: no reference model kept)
    drop_above: float | None = None  # drop groups whose rewards are all >= this (None: never)
    min_reward_std: float = 1e-6  # drop groups whose rewards spread less than this (no signal)
    # Rollout engine states (KV cache and CUDA graphs each, one per set of trained steps) kept across steps, the
    # rollout copy refreshed in place; 0: the copy is built each step and freed before the update (less memory).
    rollout_states: int = 1

    def __post_init__(self) -> None:
        for name in ("group_size", "prompts_per_step", "prompt_pool", "image_size", "head_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"rl.group_size must be >= 2 (advantages are group-relative), got {self.group_size}")
        if self.rule not in ("sde", "cps"):
            raise ValueError(f"rl.rule must be sde or cps (a stochastic rule), got {self.rule!r}")
        if self.prompts != "shapes" and not self.prompts.startswith("file:"):
            raise ValueError(f"rl.prompts must be 'shapes' or 'file:PATH', got {self.prompts!r}")
        if not 0 <= self.edit_fraction <= 1:
            raise ValueError(f"rl.edit_fraction must be in [0, 1], got {self.edit_fraction}")
        if self.edit_fraction > 0 and self.prompts != "shapes":
            raise ValueError(f"rl.edit_fraction > 0 needs rl.prompts 'shapes' (edit scenes), got {self.prompts!r}")
        if self.rollout_states < 0:
            raise ValueError(f"rl.rollout_states must be >= 0, got {self.rollout_states}")
        bad = [i for i in self.train_steps if not 0 <= i < self.head_steps]
        if bad or not self.train_steps:
            raise ValueError(f"rl.train_steps must be a non-empty subset of 0..{self.head_steps - 1}, got {bad}")
        if not 0 <= self.steps_per_rollout <= len(set(self.train_steps)):
            raise ValueError(
                f"rl.steps_per_rollout must be in [0, {len(set(self.train_steps))}] (the train_steps), "
                f"got {self.steps_per_rollout}"
            )
        if not 0 < self.clip < 1 or self.kl_weight < 0 or not 0 <= self.noise_level <= 1 or self.shift <= 0:
            raise ValueError(
                f"rl needs 0 < clip < 1, kl_weight >= 0, 0 <= noise_level <= 1, shift > 0; got {self.clip}, "
                f"{self.kl_weight}, {self.noise_level}, {self.shift}"
            )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self) -> None:
        if self.training.mode == "rl" and self.model.precomputed_latents:
            raise ValueError(
                "training.mode=rl decodes its rollouts: it needs the VAE (model.precomputed_latents=false)"
            )
        if self.lora.enabled and self.training.train_modules:
            raise ValueError(
                f"training.train_modules={self.training.train_modules} conflicts with lora.enabled "
                "(use lora.full_modules)"
            )


# ---- (de)serialisation ---------------------------------------------------------------------------


def to_dict(cfg: Any) -> Any:
    """Plain JSON-able tree of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild a config dataclass from `to_dict` output; unknown keys are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(f"unknown config key {prefix + key!r}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, prefix + key + ".")
        kwargs[key] = value
    return cls(**kwargs)


def load_json(path: str | Path) -> TrainConfig:
    return from_dict(TrainConfig, json.loads(Path(path).read_text()))


def dumps(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


# ---- dotted overrides ----------------------------------------------------------------------------


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """`value` (parsed from the command line) as type `tp`, or a ValueError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        return value if isinstance(value, str) else json.dumps(value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a JSON list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(_check_type(key, v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        out = [_check_type(key, v, item) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a JSON object, got {value!r}")
        vt = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: _check_type(key, v, vt) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a JSON object, got {value!r}")
        return from_dict(tp, value, key + ".")
    return value


def _parse_value(text: str) -> Any:
    """JSON where it parses (numbers, true/false, null, lists, objects), else the raw string."""
    lowered = text.strip()
    if lowered in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[lowered]
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.field=value` strings; returns a new validated config. Errors name the key."""
    tree = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        cls: Any = TrainConfig
        node = tree
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            if not (dataclasses.is_dataclass(cls) and part in {f.name for f in dataclasses.fields(cls)}):
                known = ", ".join(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ""
                raise ValueError(f"unknown config key {path!r}" + (f" (known here: {known})" if known else ""))
            tp = typing.get_type_hints(cls)[part]
            if i == len(parts) - 1:
                value = _check_type(path, _parse_value(text), tp)
                node[part] = to_dict(value)
            else:
                node, cls = node[part], tp
    try:
        return from_dict(TrainConfig, tree)
    except TypeError as e:
        raise ValueError(f"invalid config: {e}") from None


# ---- presets -------------------------------------------------------------------------------------


def load_preset(name: str) -> TrainConfig:
    """`configs.debug`, `debug`, or a file path `configs/debug.py`; the module defines `config`."""
    if name.endswith(".py") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"_nextstep_preset_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module_name = name if "." in name else f"configs.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name and not module_name.startswith(f"{e.name}."):
                raise
            raise ValueError(f"no config preset {name!r} (looked for module {module_name})") from None
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"preset {name!r} must define `config = TrainConfig(...)`")
    return cfg


def resolve(preset: str, overrides: list[str]) -> TrainConfig:
    return apply_overrides(load_preset(preset), overrides)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree and not prefix.endswith("module_lr."):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """`key: a -> b` for every leaf that differs."""
    fa, fb = _flat(to_dict(a)), _flat(to_dict(b))
    return [
        f"{k}: {json.dumps(fa.get(k))} -> {json.dumps(fb.get(k))}"
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k)
    ]


def main(argv: list[str] | None = None) -> int:
    """`nextstep config show NAME [overrides]` / `nextstep config diff A B`."""
    parser = ArgumentParser(prog="nextstep config", description="inspect training configs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print the resolved config as JSON")
    show.add_argument("name", help="preset module (configs.debug / debug) or file (configs/debug.py)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=10")
    d = sub.add_parser("diff", help="print the keys that differ between two configs")
    d.add_argument("a")
    d.add_argument("b")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "show":
            print(dumps(resolve(args.name, args.overrides)))
        else:
            lines = diff(load_preset(args.a), load_preset(args.b))
            print("\n".join(lines) if lines else "(identical)")
    except (ValueError, FileNotFoundError) as e:
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2
    return 0


def eshow_main(argv: list[str] | None = None) -> int:
    """Official `eshow configs/x.py [configs/y.py]`: show one config or diff two."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and not any("=" in a for a in argv):
        return main(["diff", *argv])
    if not argv:
        print("usage: eshow CONFIG [CONFIG_B | overrides...]", file=sys.stderr)
        return 2
    return main(["show", *argv])
