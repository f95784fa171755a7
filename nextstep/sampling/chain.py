"""Multi-turn editing and the record of how an image was made: each turn's model, command, prompt, every sampling
option, seed, turn index and the pixel hash of the image it started from, so that a chain of edits replays.

The record travels with the image as JSON in `image.info["nextstep"]`: save_png / encode_png write it as a PNG
text chunk (`metadata={KEY: image.info[KEY]}`) and PIL reads it back into `info` when the PNG is opened.

pipe = nextstep.load()
turns = edit_chain(pipe, Image.open("in.png"), ["make the star yellow", "add a blue circle"], seed=0)
again = replay(pipe, Chain.from_json(turns[-1].info[KEY]), Image.open("in.png"))  # the same pixels
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import secrets
from dataclasses import asdict, dataclass, replace

import torch
from PIL import Image

from nextstep.sampling.options import FIELDS, MAX_SEED, GenerateOptions, OptionError, check_value
from nextstep.sampling.pipeline import OnToken, Pipeline

log = logging.getLogger(__name__)

KEY = "nextstep"  # PNG text chunk, and PIL image.info key, of the record
VERSION = 1  # of the record's JSON layout
COMMANDS = ("generate", "edit")
NOT_RECORDED = ("seed", "progress")  # seed is a field of its own; progress changes no pixel


@dataclass
class Turn:
    """One pipeline call that made an image."""

    model: str | None  # the model as it was named (directory, Hugging Face id or zoo name); None if unknown
    command: str  # "generate" or "edit"
    prompt: str  # the text prompt, or the edit's instruction
    seed: int
    options: dict  # every other GenerateOptions field as the pipeline ran it, size as [height, width]
    turn: int  # 0: a generated image; 1, 2, ...: the edits since the chain's first image
    parent_sha256: str | None  # pixel_sha256 of the image this edit started from; None for generate
    sha256: str  # pixel_sha256 of the image this turn made
    index: int = 0  # which of the call's options["n"] images
    # Where it ran (platform_of): pixels reproduce on the same device kind, dtype, quantisation and torch.
    # None in records written before it was recorded.
    platform: str | None = None


@dataclass
class Chain:
    """The turns that made an image, from the first to the image's own (the last)."""

    turns: list[Turn]
    source: str | None = None  # where the first edit's source image was read from (a path as given), if known

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "source": self.source, "turns": [asdict(t) for t in self.turns]})

    @classmethod
    def from_json(cls, text: str) -> Chain:
        """Parse and check a record (it comes from a file or an upload): ValueError naming what is wrong."""
        try:
            raw = json.loads(text)
            if raw.get("version") != VERSION:
                raise ValueError(f"version {raw.get('version')!r} is not {VERSION}")
            chain = cls([Turn(**t) for t in raw["turns"]], raw["source"])
            _check(chain)
        except (ValueError, TypeError, KeyError, AttributeError, OptionError) as e:
            raise ValueError(f"bad {KEY} record: {e}") from None
        return chain

    def then(self, turn: Turn) -> Chain:
        return replace(self, turns=[*self.turns, turn])


def _check(chain: Chain) -> None:
    """The record's types and links: a generation can only come first, and each turn starts from the image the
    turn before it made."""
    if not chain.turns:
        raise ValueError("no turns")
    for k, t in enumerate(chain.turns):
        first = 1 if t.command == "edit" else 0
        if t.command not in COMMANDS or (t.command == "generate" and k) or (k == 0 and t.turn != first):
            raise ValueError(f"turn {k}: a {t.command!r} turn numbered {t.turn!r} cannot come there")
        if k and (t.parent_sha256 != chain.turns[k - 1].sha256 or t.turn != chain.turns[k - 1].turn + 1):
            raise ValueError(f"turn {k} does not start from the image turn {k - 1} made")
        texts, optional = (t.prompt, t.sha256), (t.model, t.platform)
        if not (all(isinstance(x, str) for x in texts) and all(isinstance(x, str | None) for x in optional)):
            raise ValueError(f"turn {k}: model, prompt, sha256 or platform of the wrong type")
        if type(t.seed) is not int or type(t.index) is not int or not 0 <= t.index < unrecorded(t).n:
            raise ValueError(f"turn {k}: bad seed {t.seed!r} or index {t.index!r}")


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of an image's size and RGB pixels: the same for a PNG with or without its record."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()


def platform_of(pipe: Pipeline) -> str:
    """The device, dtype, weight quantisation and torch version a pipeline samples with, e.g.
    "cuda NVIDIA H200, bfloat16, fp8 weights, torch 2.11.0" or "cpu x86_64, float32, torch 2.13.0"."""
    from nextstep.sampling.quantize import QuantizedLinear

    weight = pipe.model.embed_tokens.weight
    where = torch.cuda.get_device_name(weight.device) if weight.device.type == "cuda" else platform.machine()
    parts = [f"{weight.device.type} {where}", str(weight.dtype).removeprefix("torch.")]
    quantized = next((m for m in pipe.model.modules() if isinstance(m, QuantizedLinear)), None)
    if quantized is not None:
        parts.append("fp8 weights" if quantized.weight.dtype.is_floating_point else "int8 weights")
    return ", ".join([*parts, f"torch {torch.__version__}"])


def turn_seed(seed: int, k: int) -> int:
    """The seed of the k-th instruction (from 0) of one chain call: seed, seed + 1, ... (wrapping past MAX_SEED)."""
    return (seed + k) % (MAX_SEED + 1)


def run_options(pipe: Pipeline, command: str, image: Image.Image | None, options: dict) -> GenerateOptions:
    """Every option as the pipeline resolves them for one call: its defaults (for an edit, the editing ones and the
    source's size, as Pipeline.edit does), then `options`; a seed of None becomes a random one, to be recorded."""
    defaults = {**pipe.defaults}
    if command == "edit":
        defaults.update(pipe.edit_defaults, size=pipe.snap_size(image.size))
    opts = replace(GenerateOptions(**defaults), **options)
    return opts if opts.seed is not None else replace(opts, seed=secrets.randbelow(2**31))


def recorded(opts: GenerateOptions) -> dict:
    """opts as a record's options: every field but seed and progress, size as [height, width]."""
    return {name: (list(v) if name == "size" else v) for name, v in asdict(opts).items() if name not in NOT_RECORDED}


def unrecorded(turn: Turn) -> GenerateOptions:
    """A turn's options and seed as the pipeline takes them, each checked against the schema (a record is
    untrusted input). An option the record lacks takes its schema default: fields added later keep old records."""
    if not isinstance(turn.options, dict):
        raise ValueError(f"options must be an object, got {turn.options!r}")
    options = {**turn.options, "seed": turn.seed}
    for name, value in options.items():
        if name not in FIELDS or name == "progress":
            raise OptionError(name, f"unknown option {name!r}")
        kind = FIELDS[name].type.split(" ")[0]  # the annotation: "int", "float", "bool", "str", "tuple[int, int]"
        if type(value) not in {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}.get(kind, (list,)):
            raise OptionError(name, f"{name} must be of type {kind}, got {value!r}")
        check_value(name, value)
    if "size" in options:
        options["size"] = tuple(options["size"])
    return GenerateOptions(**options)


def chain_of(image: Image.Image) -> Chain | None:
    """The chain an image carries, if it is well formed and its last turn made exactly these pixels; None for any
    other image (no record, a damaged one, or pixels changed since), whose edits start a new chain."""
    text = image.info.get(KEY)
    if text is None:
        return None
    try:
        chain = Chain.from_json(text)
    except ValueError as e:
        log.warning("ignoring the image's record: %s", e)
        return None
    return chain if chain.turns[-1].sha256 == pixel_sha256(image) else None


def generated(
    image: Image.Image,
    prompt: str,
    opts: GenerateOptions,
    *,
    model: str | None,
    index: int = 0,
    platform: str | None = None,
) -> Image.Image:
    """`image`, made by generate(prompt, **opts) as image `index` (on `platform`), with its record in info."""
    turn = Turn(model, "generate", prompt, opts.seed, recorded(opts), 0, None, pixel_sha256(image), index, platform)
    image.info[KEY] = Chain([turn]).to_json()
    return image


def parent_of(image: Image.Image, source_path: str | None = None) -> tuple[Chain, str]:
    """What an edit of `image` continues, and `image`'s pixel hash: the chain it carries, or a new, empty one
    starting from `source_path` (where it was read from, if known) when it carries none."""
    before = chain_of(image)
    if before is None:
        return Chain([], source_path), pixel_sha256(image)
    return before, before.turns[-1].sha256


def edited(
    image: Image.Image,
    parent: tuple[Chain, str],
    instruction: str,
    opts: GenerateOptions,
    *,
    model: str | None,
    index: int = 0,
    platform: str | None = None,
) -> Image.Image:
    """`image`, made by edit(source, instruction, **opts) as image `index` (on `platform`), with its record in
    info: the chain `parent` (parent_of(source)) continued by this turn."""
    before, sha256 = parent
    number = before.turns[-1].turn + 1 if before.turns else 1
    sha = pixel_sha256(image)
    turn = Turn(model, "edit", instruction, opts.seed, recorded(opts), number, sha256, sha, index, platform)
    image.info[KEY] = before.then(turn).to_json()
    return image


def generate(
    pipe: Pipeline, prompt: str, *, model: str | None = None, on_token: OnToken | None = None, **options
) -> list[Image.Image]:
    """pipe.generate(prompt, **options), each image with its record (a random seed when seed is None);
    on_token as in Pipeline.generate (not recorded: it does not change the images)."""
    opts = run_options(pipe, "generate", None, options)
    images = pipe.generate(prompt, on_token=on_token, **asdict(opts))
    where = platform_of(pipe)
    return [generated(image, prompt, opts, model=model, index=i, platform=where) for i, image in enumerate(images)]


def edit(
    pipe: Pipeline,
    image: Image.Image,
    instruction: str,
    *,
    model: str | None = None,
    source_path: str | None = None,
    on_token: OnToken | None = None,
    **options,
) -> list[Image.Image]:
    """pipe.edit(image, instruction, **options), each of its n images with its record (see `edited`);
    on_token as in Pipeline.edit."""
    opts = run_options(pipe, "edit", image, options)
    parent = parent_of(image, source_path)
    images = pipe.edit(image, instruction, on_token=on_token, **asdict(opts))
    where = platform_of(pipe)
    return [
        edited(out, parent, instruction, opts, model=model, index=i, platform=where) for i, out in enumerate(images)
    ]


def edit_chain(
    pipe: Pipeline,
    image: Image.Image,
    instructions: list[str],
    *,
    model: str | None = None,
    source_path: str | None = None,
    **options,
) -> list[Image.Image]:
    """Edit `image` by each instruction in turn, each turn editing the result of the one before; returns every
    turn's image, each with its record in info. Instruction k (from 0) runs with turn_seed(seed, k): the first
    takes `seed` itself, as a single edit does (seed None: a random one, recorded). An image carrying a chain
    (a result of this function, or its saved PNG) continues it."""
    if isinstance(instructions, str) or not instructions:
        raise ValueError(f"instructions must be a non-empty list of strings, got {instructions!r}")
    if options.get("n", 1) != 1:
        raise ValueError(f"an edit chain makes one image per turn, got n={options['n']}")
    seed = run_options(pipe, "edit", image, options).seed
    images = []
    for k, instruction in enumerate(instructions):
        options["seed"] = turn_seed(seed, k)
        (image,) = edit(pipe, image, instruction, model=model, source_path=source_path, **options)
        images.append(image)
    return images


def replay(pipe: Pipeline, chain: Chain, source: Image.Image | None = None) -> list[Image.Image]:
    """Run every turn of `chain` again, each from the image the replay's turn before made; returns each turn's
    image with its record. `source` is the image the chain's first edit started from (not needed when the chain
    starts with a generation). A turn reproduced when pixel_sha256(images[k]) == chain.turns[k].sha256."""
    first = chain.turns[0]
    if first.command == "edit":
        if source is None:
            raise ValueError(f"the chain starts by editing an image ({chain.source or 'not recorded'}): give it")
        if pixel_sha256(source) != first.parent_sha256:
            raise ValueError(
                f"the source image has other pixels (sha256 {pixel_sha256(source)[:12]}...) than the one the chain "
                f"started from ({first.parent_sha256[:12]}...)"
            )
    images, image = [], source
    for k, turn in enumerate(chain.turns):
        opts = asdict(unrecorded(turn))
        if turn.command == "generate":
            out = pipe.generate(turn.prompt, **opts)[turn.index]
        else:
            out = pipe.edit(image, turn.prompt, **opts)[turn.index]
        out.info[KEY] = Chain(chain.turns[: k + 1], chain.source).to_json()
        images.append(out)
        image = out
    return images


def diverged(chain: Chain, images: list[Image.Image]) -> int | None:
    """The first turn whose replayed image differs from the recorded one, or None when all reproduced."""
    pairs = zip(chain.turns, images, strict=True)
    return next((k for k, (turn, image) in enumerate(pairs) if turn.sha256 != pixel_sha256(image)), None)
