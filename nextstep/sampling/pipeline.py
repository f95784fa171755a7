"""Text-to-image and editing pipelines with the official prompt templates, decoding on the pipeline's engine.

pipe = nextstep.load("path/to/checkpoint")
images = pipe.generate("a red fox in the snow", size=(512, 512), seed=0)
edited = pipe.edit(Image.open("in.png"), "make the sky blue")
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from nextstep.model.checkpoint import check_model_dir
from nextstep.model.nextstep import NextStep, patchify, unpatchify
from nextstep.model.tokenizer import BOI, EOI, IMAGE_AREA, IMAGE_PLACEHOLDER, TextTokenizer
from nextstep.model.vae import AutoEncoder, load_vae, pil_to_pixels, pixels_to_pil
from nextstep.sampling.engine import Engine
from nextstep.sampling.flow import FlowSettings, guidance_rows
from nextstep.sampling.limits import read_trained, warn_unknown_instructions, warn_unknown_words, warn_untrained_size
from nextstep.sampling.options import (  # noqa: F401  (re-exported: the schema's old home)
    ENGINES,
    MAX_BATCH,
    MAX_PROMPT_TOKENS,
    MAX_SIDE,
    GenerateOptions,
    check_options,
)
from nextstep.sampling.quant_checkpoint import load_model

# on_token(k, tokens): called after image token k with the (B, k + 1, D) float32 tokens sampled so far.
OnToken = Callable[[int, torch.Tensor], None]

DEFAULTS_FILE = "sampling_defaults.json"  # optional per-checkpoint overrides of GenerateOptions defaults
EDIT_DEFAULTS = {
    "cfg": 7.5,
    "cfg_img": 2.0,
    "shift": 3.2,
    "use_norm": True,
    "steps": 50,
    "negative_prompt": "Copy original image.",
}


@dataclass
class Trace:
    """Intermediate tensors of one generation, for parity checks and debugging."""

    input_ids: torch.Tensor | None = None  # (R, L) prefill ids, R = rows * B
    attention_mask: torch.Tensor | None = None  # (R, L)
    inputs_embeds: torch.Tensor | None = None  # (R, L, d)
    prefill_hidden: torch.Tensor | None = None  # (R, L, d)
    conditions: list[torch.Tensor] = field(default_factory=list)  # per token (R, d)
    raw_tokens: list[torch.Tensor] = field(default_factory=list)  # per token (B, D) before use_norm
    final_latents: torch.Tensor | None = None  # (B, C, H, W) raw VAE latents fed to the decoder
    decoded: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]


def read_defaults(path: Path) -> dict:
    """A checkpoint's recommended sampling options (e.g. its training resolution), if it ships any."""
    file = path / DEFAULTS_FILE
    if not file.is_file():
        return {}
    raw = json.loads(file.read_text())
    known = {f.name for f in dataclasses.fields(GenerateOptions)}
    for options in (raw, raw.get("edit", {})):
        for key in options:
            if key not in known | {"edit", "trained"}:
                raise ValueError(f"unknown option {key!r} in {file}")
        if "size" in options:
            options["size"] = tuple(options["size"])
    raw["trained"] = read_trained(raw.get("trained", {}), str(file))
    return raw


class Pipeline:
    def __init__(self, model: NextStep, vae: AutoEncoder, tokenizer: TextTokenizer, *, defaults: dict | None = None):
        self.model, self.vae, self.tokenizer = model, vae, tokenizer
        tokenizer.token_id(IMAGE_AREA)  # fail at load time if the tokenizer lacks the image-area marker
        defaults = dict(defaults or {})
        self.trained = defaults.pop("trained", read_trained({}, ""))  # what the model was trained for (limits.py)
        self.edit_defaults = {**EDIT_DEFAULTS, **defaults.pop("edit", {})}  # editing: official, then checkpoint
        self.defaults = defaults
        self._engine: tuple[tuple[bool, bool], Engine] | None = None  # ((eager, compile), engine) from engine()
        self.engine_options: dict = {}  # Engine's max_states and batch_buckets (configure_engine)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantize: str = "none",
    ) -> Pipeline:
        """Load model, VAE and tokenizer; quantize: none | int8 | fp8 weight-only for the decoder and head."""
        path = check_model_dir(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = load_model(path, dtype=dtype, device=device, quantize=quantize)  # a quantised checkpoint as stored
        vae = load_vae(path / "vae", dtype=dtype, device=device)
        return cls(model, vae, TextTokenizer(path), defaults=read_defaults(path))

    @property
    def family(self) -> str:
        return self.model.config.family

    @property
    def down_factor(self) -> int:
        """Pixels per image-token side: VAE downsampling x latent patch."""
        return self.vae.config.down_factor * self.model.config.latent_patch_size

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Image tokens (rows, columns) of an image of `size` (H, W) pixels."""
        return size[0] // self.down_factor, size[1] // self.down_factor

    # ---- public API ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[str],
        *,
        trace: Trace | None = None,
        draw=None,
        on_token: OnToken | None = None,
        **options,
    ) -> list[Image.Image]:
        """Text-to-image. Returns len(prompts) * n images, prompt-major.

        draw(shape) -> tensor replaces the seeded generator for every random draw (replay, per-request seeds).
        on_token(k, tokens) runs after image token k with the (B, k + 1, D) tokens so far (a view: copy what
        is kept); an exception it raises stops the generation and propagates (cancellation, deadlines).
        """
        opts = replace(GenerateOptions(**self.defaults), **options)
        prompts = _as_list(prompts, "prompt")
        warn_unknown_words(self.trained, prompts)
        captions = [p + (" " + opts.positive_prompt if opts.positive_prompt else "") for p in prompts]
        return self._run(captions, [[] for _ in captions], opts, trace, draw, on_token)

    def edit(
        self,
        images: Image.Image | list[Image.Image],
        instructions: str | list[str],
        *,
        trace: Trace | None = None,
        draw=None,
        on_token: OnToken | None = None,
        **options,
    ) -> list[Image.Image]:
        """Instruction editing: the source image is encoded into the prompt; output defaults to its size.

        draw and on_token as in generate."""
        images = images if isinstance(images, list) else [images]
        instructions = _as_list(instructions, "instruction")
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images for {len(instructions)} instructions")
        opts = GenerateOptions(**{**self.defaults, **self.edit_defaults, "size": self.snap_size(images[0].size)})
        opts = replace(opts, **options)
        check_options(opts, self.down_factor)
        warn_unknown_instructions(self.trained, instructions)
        inputs = [self.edit_input(img, text, opts.size) for img, text in zip(images, instructions, strict=True)]
        return self._run([c for c, _ in inputs], [[src] for _, src in inputs], opts, trace, draw, on_token)

    def edit_chain(self, image: Image.Image, instructions: list[str], **options) -> list[Image.Image]:
        """Edit `image` by each instruction in turn, each editing the result before; returns every turn's image,
        its record (seed, options, turn, parent hash) in image.info["nextstep"]. See sampling/chain.py."""
        from nextstep.sampling.chain import edit_chain

        return edit_chain(self, image, instructions, **options)

    # ---- prompt building -----------------------------------------------------------------------
    def snap_size(self, wh: tuple[int, int]) -> tuple[int, int]:
        """An input image's (width, height) -> the (height, width) an edit makes by default: at most MAX_SIDE,
        snapped down to whole image tokens."""
        d = self.down_factor
        w, h = wh
        if w < d or h < d:
            raise ValueError(f"input image {w}x{h} is smaller than {d} px")
        return (min(h, MAX_SIDE) // d * d, min(w, MAX_SIDE) // d * d)

    def edit_input(self, image: Image.Image, instruction: str, size: tuple[int, int]) -> tuple[str, Image.Image]:
        """What an edit conditions on: its caption (the source's image placeholders, then the instruction) and
        the RGB source resized to `size` (h, w), whose tokens fill the placeholders."""
        if image.size != (size[1], size[0]):
            image = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        return self._image_string(size) + instruction, image.convert("RGB")

    def _image_string(self, size: tuple[int, int]) -> str:
        h, w = self.grid(size)
        return f"{IMAGE_AREA}{h}*{w}{BOI}" + IMAGE_PLACEHOLDER * (h * w) + EOI

    def _rows(
        self, captions: list[str], sources: list[list[Image.Image]], opts: GenerateOptions
    ) -> tuple[list[str], list[list[Image.Image]]]:
        """Branch rows stacked [cond; uncond...] (official order), each repeated n times per prompt."""
        rows = guidance_rows(opts.cfg, opts.cfg_img)
        captions = [c for c in captions for _ in range(opts.n)]
        sources = [s for s in sources for _ in range(opts.n)]
        texts, images = list(captions), list(sources)
        if rows == 3:
            texts += [
                self._image_string(opts.size) + opts.negative_prompt if s else opts.negative_prompt for s in sources
            ]
            images += sources
        if rows >= 2:
            texts += [opts.negative_prompt] * len(captions)
            images += [[] for _ in captions]
        return texts, images

    def tokenize(self, texts: list[str], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask (R, L), every row ending with `<|image_area|>h*w` + boi."""
        ids = [self.tokenizer.encode(t) for t in texts]
        placeholder = self.model.config.image_placeholder_id
        for t, row in zip(texts, ids, strict=True):
            n_text = len(row) - row.count(placeholder)
            if n_text > MAX_PROMPT_TOKENS:
                raise ValueError(f"prompt of {n_text} tokens exceeds {MAX_PROMPT_TOKENS}: {t[:60]!r}...")
        h, w = self.grid(size)
        suffix = self.tokenizer.encode(f"{IMAGE_AREA}{h}*{w}") + [self.model.config.boi]
        width = max(len(r) for r in ids)
        pad = self.model.config.pad_token_id_added
        input_ids = torch.tensor([[pad] * (width - len(r)) + r + suffix for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * (len(r) + len(suffix)) for r in ids])
        return input_ids, mask

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(
        self, captions, sources, opts: GenerateOptions, trace: Trace | None, draw=None, on_token=None
    ) -> list[Image.Image]:
        check_options(opts, self.down_factor)
        warn_untrained_size(self.trained, opts.size)
        if len(captions) * opts.n > MAX_BATCH:
            raise ValueError(f"{len(captions)} prompts x n={opts.n} exceeds the batch limit of {MAX_BATCH}")
        settings = self._settings(opts)
        texts, images = self._rows(captions, sources, opts)
        input_ids, attn = self.tokenize(texts, opts.size)
        pixels = [pil_to_pixels(img) for row in images for img in row]
        latents = self.encode_images(pixels)
        seed = opts.seed if opts.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        tokens = self.generate_tokens(
            input_ids, attn, latents, settings, opts, seed=seed, trace=trace, draw=draw, on_token=on_token
        )
        h, w = self.grid(opts.size)
        decoded = self.decode_tokens(tokens, h, w, trace)
        return [pixels_to_pil(x) for x in decoded]

    def _settings(self, opts: GenerateOptions) -> FlowSettings:
        return FlowSettings(
            family=self.family,
            num_steps=opts.steps,
            shift=opts.shift,
            rule=opts.sampler,
            noise_level=opts.noise_level,
            last_step_size=opts.last_step_size,
        )

    def configure_engine(self, *, max_states: int = 1, batch_buckets: tuple[int, ...] = ()) -> None:
        """How the engine keeps decoding states (a server's batches vary in size): up to `max_states` of them,
        and calls padded up to the smallest of `batch_buckets` that holds them (Engine)."""
        self.engine_options = {"max_states": max_states, "batch_buckets": tuple(batch_buckets)}
        self._engine = None

    @torch.inference_mode()
    def warm(self, batch: int, **options) -> None:
        """Build the engine's state for text-to-image calls of `batch` images with these options (a short
        prompt's cache bucket): caches allocated, head kernels tuned, CUDA graphs captured."""
        opts = replace(GenerateOptions(**self.defaults), **options, n=1)
        check_options(opts, self.down_factor)
        texts, _ = self._rows(["warm-up"] * batch, [[] for _ in range(batch)], opts)
        input_ids, _ = self.tokenize(texts, opts.size)
        n_tokens = math.prod(self.grid(opts.size))
        self.engine(opts).prepare(tuple(input_ids.shape), self._settings(opts), opts, n_tokens=n_tokens)

    def engine(self, opts: GenerateOptions) -> Engine:
        """This pipeline's engine for opts.engine, kept between calls; one at a time (its state holds the KV
        cache). eager: the same code without CUDA graphs or fused kernels; fast: graphs and fused kernels
        where the device has them; compiled: fast with torch.compile; auto: fast on GPU, eager on CPU."""
        eager = opts.engine == "eager" or (opts.engine == "auto" and not self.model.embed_tokens.weight.is_cuda)
        kind = (eager, opts.engine == "compiled")
        if self._engine is None or self._engine[0] != kind:
            self._engine = None
            gc.collect()  # a state and its graphs form a reference cycle: free them before the next one
            off = False if eager else None  # None: wherever the device has them
            engine = Engine(self.model, graphs=off, compile=kind[1], head_kernels=off, **self.engine_options)
            self._engine = kind, engine
        return self._engine[1]

    def encode_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Source images (each (1, 3, H, W) in [-1, 1]) -> their image tokens in order (N, D)."""
        p = self.model.config.latent_patch_size
        if not pixels:
            return torch.zeros(0, self.model.config.token_dim, device=self.model.embed_tokens.weight.device)
        toks = [patchify(self.vae.encode(x.to(self.vae.decoder.conv_in.weight)), p)[0] for x in pixels]
        return torch.cat(toks)

    def decode_tokens(self, tokens: torch.Tensor, h: int, w: int, trace: Trace | None = None) -> torch.Tensor:
        """Model tokens (B, h*w, D) -> pixels (B, 3, H, W) in [-1, 1]."""
        latents = unpatchify(tokens, self.model.config.latent_patch_size, h, w)
        z = self.vae.denormalize_latents(latents.to(self.vae.decoder.conv_in.weight.dtype))
        decoded = self.vae.decode_raw(z).float()
        if trace is not None:
            trace.final_latents, trace.decoded = z.float(), decoded
        return decoded

    def generate_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        settings: FlowSettings,
        opts: GenerateOptions,
        *,
        seed: int,
        trace: Trace | None = None,
        draw=None,
        on_token: OnToken | None = None,
    ) -> torch.Tensor:
        """The autoregressive loop on the engine opts.engine picks: prefill, then per image token sample with
        the head and feed back.

        input_ids, attention_mask: (R, L) with R = rows * B; image_tokens (N, D) fill the placeholders.
        Returns the fed-back tokens (B, h*w, D). `draw` overrides the seeded generator (replay); `on_token`
        as in generate.
        """
        n_tokens = math.prod(self.grid(opts.size))
        return self.engine(opts).generate(
            input_ids,
            attention_mask,
            image_tokens,
            settings,
            opts,
            n_tokens=n_tokens,
            seed=seed,
            draw=draw,
            on_token=on_token,
            trace=trace,
        )


def _as_list(value: str | list[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"no {what} given")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{what} must be a non-empty string, got {item!r}")
    return items
