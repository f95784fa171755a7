"""Sampling options, one schema: names, defaults, help, choices and bounds of every option, read by the library's
validation, the CLI's flags, the HTTP API's request fields and the demo's controls. No torch here: the CLI parses
and validates with it before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

MAX_PROMPT_TOKENS = 1024  # longest prompt text accepted, in tokens (source-image placeholders not counted)
MAX_BATCH = 64  # most images one call may make
MAX_SIDE = 2048  # largest image side in pixels
MAX_STEPS = 1000  # most flow-matching head steps per token (the official recipes use 28-50)
MAX_SEED = 2**63 - 1  # seeds are from 0 to this (torch.Generator.manual_seed's range)

ENGINES = ("auto", "fast", "compiled", "eager")
SAMPLERS = ("sde", "ode", "cps")
CFG_SCHEDULES = ("constant", "linear")


def option(
    default,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    label: str | None = None,
    cli: bool = True,
    api: bool = False,
    task: str | None = None,
    ui: tuple[float, float, float] | None = None,
):
    """A GenerateOptions field with its metadata.

    choices: allowed strings; low/high: inclusive bounds (low exclusive with open_low), NaN and inf always refused;
    label: the name in error messages; cli: a --flag of `nextstep generate/edit`; api: a field of the HTTP
    request; task: "generate" or "edit" when only one of them takes it; ui: (min, max, step) of a demo slider.
    """
    meta = dict(help=help, choices=choices, low=low, high=high, open_low=open_low, label=label)
    meta.update(cli=cli, api=api, task=task, ui=ui)
    return field(default=default, metadata=meta)


@dataclass
class GenerateOptions:
    size: tuple[int, int] = option((512, 512), "WIDTHxHEIGHT in pixels, multiples of the model's token size", api=True)
    steps: int = option(
        28, "flow-matching head steps per token", low=0, open_low=True, high=MAX_STEPS, api=True, ui=(1, 100, 1)
    )
    cfg: float = option(7.5, "text guidance scale (1 = off)", low=0, open_low=True, high=100, api=True, ui=(1, 15, 0.5))
    cfg_img: float = option(
        1.0, "image guidance scale (1 = off)", low=0, open_low=True, high=100, api=True, task="edit", ui=(1, 5, 0.1)
    )
    cfg_schedule: str = option("constant", "guidance over the image tokens", choices=CFG_SCHEDULES)
    cfg_normalize: bool = option(False, "norm-rescaled guidance (NextStep-1.1)")
    shift: float = option(1.0, "timestep shift", low=0, open_low=True, high=100, api=True)
    sampler: str = option("sde", "head update rule (cps: NextStep-1.1 only)", choices=SAMPLERS)
    noise_level: float = option(0.8, "SDE/CPS noise scale (NextStep-1.1)", low=0, high=10)
    last_step_size: float = option(0.04, "final deterministic step (NextStep-1)", low=0, high=1)
    use_norm: bool = option(False, "layer-normalise sampled tokens before feeding them back")
    # Std of Gaussian noise on each sampled token as the backbone reads it back (the image keeps the clean
    # token): for models trained with training.image_input_noise. One extra (B, D) draw per fed-back token.
    context_noise: float = option(0.0, "noise std on tokens read back (image-input-noise models)", low=0, high=10)
    seed: int | None = option(0, "random seed (same seed, same image); None draws one", low=0, high=MAX_SEED, api=True)
    n: int = option(1, "images per prompt", low=1, high=MAX_BATCH, label="n (images per prompt)")
    positive_prompt: str = option("", "text appended to each prompt", task="generate")
    negative_prompt: str = option("", "text of the unconditional branch", api=True)
    progress: bool = option(False, "tqdm bar over image tokens", cli=False)
    engine: str = option(
        "auto",
        "auto: CUDA-graph engine on GPU, eager on CPU; compiled: the engine with torch.compile "
        "(fastest for large models, ~45 s to get ready at 14B)",
        choices=ENGINES,
    )


FIELDS = {f.name: f for f in dataclasses.fields(GenerateOptions)}


class OptionError(ValueError):
    """A bad option value; `name` is the option, for the API's `param`."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def check_value(name: str, value) -> None:
    """Check one option against its schema entry (type, choices, bounds, finiteness); OptionError if bad."""
    if name not in FIELDS:
        raise OptionError(name, f"unknown option {name!r}")
    meta = FIELDS[name].metadata
    label = meta["label"] or name
    if name == "size":
        if not (isinstance(value, tuple | list) and len(value) == 2 and all(type(v) is int for v in value)):
            raise OptionError(name, f"size must be (height, width) in pixels, got {value!r}")
        if not all(0 < side <= MAX_SIDE for side in value):
            raise OptionError(name, f"image size {value[0]}x{value[1]} must be from 1 to {MAX_SIDE} px per side")
    if value is None and name == "seed":
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise OptionError(name, f"{label} must be one of {', '.join(meta['choices'])}, got {value!r}")
    low, high = meta["low"], meta["high"]
    if low is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(name, f"{label} must be a number, got {value!r}")
    if not math.isfinite(value) or not (value > low if meta["open_low"] else value >= low) or value > high:
        if meta["open_low"]:
            span = f"> {low} and <= {high}"
        else:
            span = f"from {low} to {high}" if FIELDS[name].type.startswith("int") else f"in [{low}, {high}]"
        raise OptionError(name, f"{label} must be {span}, got {value}")


def check_options(opts: GenerateOptions, down: int) -> None:
    """Every option within its schema, and the size a multiple of `down` (pixels per image token side)."""
    for name in FIELDS:
        check_value(name, getattr(opts, name))
    h, w = opts.size
    if h % down or w % down:
        raise OptionError("size", f"image size {h}x{w} must be positive multiples of {down} px")


def size_arg(text: str) -> tuple[int, int]:
    """'512x768' (width x height, like most image tools) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return h, w


def add_option_args(parser: argparse.ArgumentParser, task: str) -> None:
    """One --flag per CLI option of `task` (generate | edit); unset flags stay None (the checkpoint's default)."""
    for name, f in FIELDS.items():
        meta = f.metadata
        if not meta["cli"] or meta["task"] not in (None, task):
            continue
        flag = "--" + name.replace("_", "-")
        help = f"{meta['help']} (default: {_show(f.default)})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            kind = {"size": size_arg, "int": int, "float": float, "str": str}[
                "size" if name == "size" else f.type.split(" ")[0]
            ]
            parser.add_argument(flag, type=kind, choices=meta["choices"], default=None, help=help)


def given_options(args: argparse.Namespace) -> dict:
    """The options set on the command line (flags left unset are left out), each checked against the schema."""
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    for name, value in given.items():
        check_value(name, value)
    return given


def _show(default) -> str:
    if isinstance(default, tuple):
        return f"{default[1]}x{default[0]}"
    return repr(default) if isinstance(default, str) else str(default)
