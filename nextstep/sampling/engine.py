"""Image-token decoding with the model's static KV cache: guidance rows in one batch, the flow head's steps
planned once, and each token's work as two functions (the whole head loop; one backbone step through the
model's own forward) replayed as CUDA graphs, or called directly without graphs (CPU, `--engine eager`).

    tokens = Engine(model).generate(input_ids, attention_mask, image_tokens, settings, opts, n_tokens=256, seed=0)

With `record=Recording(steps)` it also keeps, for every image token, the head's state before and after the
given steps and the velocity between them: the transitions that RL post-training scores (nextstep.rl).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nextstep.model.backbone import build_attention_mask, fuse_projections
from nextstep.model.head import AdaLNMLP, compute_dtype
from nextstep.model.nextstep import NextStep
from nextstep.sampling import head_kernels as head_kernels_mod
from nextstep.sampling import layer_kernels as layer_kernels_mod
from nextstep.sampling import pdl as pdl_mod
from nextstep.sampling import update_kernel
from nextstep.sampling.flow import FlowSettings, guidance_rows, guidance_table, guided_update, plan_steps
from nextstep.sampling.quantize import fuse_quantized, set_pdl

log = logging.getLogger(__name__)


# ---- the flow head at decode time ----------------------------------------------------------------
def step_modulations(net: AdaLNMLP, t_embed: torch.Tensor, cond: torch.Tensor) -> list[list[tuple]]:
    """net.modulations for every step at once -> per step, per block, tensors (R, W).

    They depend on (t, cond) only, so one batched GEMM per block replaces S small ones: the head reads
    its adaLN weights (57% of its bytes) once per token instead of once per step.
    """
    y = t_embed[:, None] + net.cond_embed(cond)[None]  # (S, R, W)
    # chunk() gives strided views; contiguous copies (once per token) keep each step's slices dense.
    steps = [[m.contiguous().unbind(0) for m in mod] for mod in net.modulations(y)]  # one view call per tensor
    return [[tuple(m[i] for m in mod) for mod in steps] for i in range(y.shape[0])]


def head_velocity(net: AdaLNMLP, x: torch.Tensor, mods: list[tuple], rows: int) -> torch.Tensor:
    """net(x, t_i, cond) from step i's modulations, for tokens x (B, D) shared by the guidance rows
    -> (rows * B, D) float32. head_kernels.velocity is the same with fused kernels."""
    h = net.input_proj(x.to(compute_dtype(net.input_proj))).repeat(rows, 1)  # (R, W)
    return net.trunk(h, mods).float()


@dataclass
class Recording:
    """What the head did at `steps` for every image token; generate(record=...) fills it (float32)."""

    steps: tuple[int, ...]  # head steps recorded, in this order
    x: torch.Tensor | None = None  # (B, N, S, D) state before each recorded step
    v: torch.Tensor | None = None  # (B, N, S, D) velocity the step used
    x_next: torch.Tensor | None = None  # (B, N, S, D) state after it


# ---- the engine --------------------------------------------------------------------------------
class _Graph:
    """`fn` (which writes static outputs) captured once as a CUDA graph, or called directly."""

    def __init__(self, fn, *, capture: bool, pool=None):
        self.fn, self.graph = fn, None
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm-up: cuBLAS handles, lazy inits, compilation
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                fn()

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


@dataclass(frozen=True)
class _Key:
    batch: int  # images B
    rows: int  # guidance rows
    max_len: int  # cache slots (prefix + tokens, rounded up to kv_block)
    settings: FlowSettings
    normalize: bool
    use_norm: bool
    context_noise: float  # std of the noise on the fed-back token (0: none, no extra draw)
    record: tuple[int, ...] = ()  # head steps whose (x, v, x') the head writes to `rec`


class _State:
    """Static buffers, the model's KV caches and the (captured) per-token functions for one _Key."""

    def __init__(self, engine: Engine, key: _Key):
        self.model, self.key = model, key = engine.model, key
        cfg, p = model.config, model.embed_tokens.weight
        dev, dtype, r = p.device, p.dtype, key.rows * key.batch
        self.plan = plan = plan_steps(key.settings)
        self.caches = model.setup_caches(r, key.max_len)
        self.key_valid = torch.ones(r, key.max_len, dtype=torch.bool, device=dev)
        self.slots = torch.arange(key.max_len, device=dev)
        self.slot = torch.full((1,), key.max_len - 1, dtype=torch.long, device=dev)  # harmless warm-up slot
        self.cond = torch.zeros(r, cfg.hidden_size, dtype=dtype, device=dev)  # (R, d) head condition
        # (draws, B, D): the head's draws in plan order, then the fed-back token's noise if any
        draws = plan.num_draws + (1 if key.context_noise else 0)
        self.noise = torch.zeros(draws, key.batch, cfg.token_dim, device=dev)
        self.scales = torch.ones(2, device=dev)  # this token's (cfg, cfg_img)
        self.raw = torch.zeros(key.batch, cfg.token_dim, device=dev)  # (B, D) sampled token before use_norm
        self.token = torch.zeros(key.batch, cfg.token_dim, device=dev)  # (B, D) fed-back token
        self.rec = torch.zeros(key.batch, len(key.record), 3, cfg.token_dim, device=dev)  # (B, S, [x, v, x'], D)
        with torch.inference_mode():
            self.t_embed = model.image_head.net.time_embed(plan.t.to(dev, dtype))  # (S, W), every token
        self.coef_eps = torch.tensor([c for _, _, c in plan.coef[: plan.num_eps]], device=dev)[:, None, None]
        self.launch = engine.launch_config(r) if engine.use_head_kernels(r) else None
        self.head_kernels = self.launch is not None
        if self.head_kernels:
            self.velocity = partial(head_kernels_mod.velocity, config=self.launch, pdl=engine.pdl)
            self.update = partial(update_kernel.guided_update, pdl=engine.pdl)
        else:
            compiled = torch.compile(head_velocity, dynamic=False) if engine.compile else head_velocity
            self.velocity, self.update = compiled, guided_update
        if engine.compile:
            self.layer_fn = torch.compile(type(model.layers[0]).forward, dynamic=False)
        else:
            self.layer_fn = partial(layer_kernels_mod.decode_layer, pdl=engine.pdl) if engine.layer_kernels else None
        capture, pool = engine.graphs, (torch.cuda.graph_pool_handle() if engine.graphs else None)
        # Captures run now, before any prefill: their warm-up writes only the last cache slot, which no
        # generated token attends to, and the cond/token buffers, which start() then overwrites.
        self.head = _Graph(self._head, capture=capture, pool=pool)
        n, block = key.max_len, engine.kv_block
        self.decode = {
            kv: _Graph(partial(self._decode, kv), capture=capture, pool=pool) for kv in range(block, n + 1, block)
        }

    @torch.inference_mode()
    def _head(self) -> None:
        """Integrate one token per image over all steps and guidance branches -> self.raw, self.token."""
        net, plan, key = self.model.image_head.net, self.plan, self.key
        mods = step_modulations(net, self.t_embed, self.cond)
        eps = self.noise[1 : plan.num_draws] * self.coef_eps  # (num_eps, B, D): c * eps per noisy step
        x = self.noise[0]
        for i, (a, b, _) in enumerate(plan.coef):
            v = self.velocity(net, x, mods[i], key.rows)  # (R, D)
            e = eps[i] if i < plan.num_eps else None
            x_new = self.update(x, v, self.scales, e, a, b, rows=key.rows, normalize=key.normalize)
            if i in key.record:  # one guidance row (Engine.start checks it), so v is the velocity used
                j = key.record.index(i)
                self.rec[:, j, 0].copy_(x)
                self.rec[:, j, 1].copy_(v)
                self.rec[:, j, 2].copy_(x_new)
            x = x_new
        self.raw.copy_(x)
        self.token.copy_(F.layer_norm(x, x.shape[-1:], eps=1e-6) if key.use_norm else x)

    @torch.inference_mode()
    def _decode(self, kv_len: int) -> None:
        """Feed self.token back at self.slot -> self.cond for the next token, attending to kv_len slots."""
        model, key = self.model, self.key
        token = self.token + key.context_noise * self.noise[-1] if key.context_noise else self.token
        x = model.image_in_projector(token.to(self.cond.dtype)).repeat(key.rows, 1)[:, None]  # (R, 1, d)
        mask = (self.key_valid[:, :kv_len] & (self.slots[:kv_len] <= self.slot))[:, None, None]  # (R, 1, 1, kv)
        r = x.shape[0]
        hidden = model.forward_hidden(
            x, position_ids=self.slot.expand(r, 1), mask=mask, slots=self.slot, layer_fn=self.layer_fn
        )
        self.cond.copy_(model.head_condition(hidden[:, -1]))

    def decode_graph(self, slot: int) -> _Graph:
        """The smallest captured bucket whose kv_len covers `slot`."""
        return next(g for kv, g in self.decode.items() if kv > slot)


class Engine:
    """Holds one model's decoding state; `generate` has Pipeline.generate_tokens' semantics."""

    def __init__(
        self,
        model: NextStep,
        *,
        graphs: bool | None = None,
        compile: bool = False,
        head_kernels: bool | None = None,
        layer_kernels: bool | None = None,
        kv_block: int = 256,
        max_states: int = 1,
        batch_buckets: tuple[int, ...] = (),
        pdl: bool = False,
    ):
        dev = model.embed_tokens.weight.device
        self.model = model
        self.graphs = dev.type == "cuda" if graphs is None else graphs  # capture CUDA graphs
        self.compile = compile  # torch.compile the decoder layer and the torch head before capture
        # Fused Triton head blocks (head_kernels.py, float or fp8/int8 weights). None: wherever Triton runs them,
        # up to BROADCAST_ROWS rows (H200, 14B, batch 32 = 64 rows: the tl.dot path's head takes 14.5 ms a token
        # in bf16 and 16.2 with fp8, the torch ops 10.7 and 13.3; BENCHMARKS.md); True: up to MAX_ROWS.
        self.head_kernels = head_kernels_mod.available(dev) if head_kernels is None else head_kernels
        self.head_max_rows = head_kernels_mod.BROADCAST_ROWS if head_kernels is None else head_kernels_mod.MAX_ROWS
        self._launch: dict[int, head_kernels_mod.LaunchConfig | None] = {}  # tuned per row count, kept across states
        # Fused Triton kernels between the decoder layers' GEMVs in the decode step (layer_kernels.py; not with
        # compile, which fuses its own); None: wherever Triton runs them (H200, 14B, batch 1: the backbone's
        # token 11.5 -> 9.1 ms in bf16, 9.6 -> 7.2 ms with fp8 weights; BENCHMARKS.md).
        if layer_kernels and not layer_kernels_mod.available(dev):
            raise ValueError(f"layer_kernels=True needs Triton and a CUDA device, got device {dev}")
        if layer_kernels is None:
            layer_kernels = layer_kernels_mod.available(dev) and not compile
        self.layer_kernels = bool(layer_kernels)
        self.kv_block = kv_block  # cache length granularity: one decode graph per kv_block slots
        # States kept, least recently used first: one by default, as a batch-32 cache is ~14 GB at 14B; more
        # for a caller that alternates between a few keys (RL rollouts' trained steps), so none is rebuilt.
        if max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {max_states}")
        self.max_states = max_states
        # Batch sizes a call is padded up to (the smallest that holds it; larger calls run as they are), so a
        # server whose batches vary in size reuses a few kept states instead of capturing graphs per size.
        if any(b < 1 for b in batch_buckets):
            raise ValueError(f"batch_buckets must be positive batch sizes, got {batch_buckets}")
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self._states: dict[_Key, _State] = {}
        self._state: _State | None = None  # the one last used
        # One GEMM for q/k/v and one for gate/up: float copies, or quantised ones sharing the weights' memory.
        fuse_projections(model.layers) or fuse_quantized(model.layers)
        # Programmatic dependent launch of the decode kernels (pdl.py; SM90+), off until measured; the model's
        # quantised linears take it too (an engine built later on the same model sets theirs again).
        if pdl:
            pdl_mod.check(dev)
        self.pdl = pdl
        set_pdl(model, pdl)

    def use_head_kernels(self, rows: int) -> bool:
        """Fused head kernels for `rows` guidance rows x images (small batches, where launches dominate)."""
        return self.head_kernels and rows <= self.head_max_rows

    def launch_config(self, rows: int) -> head_kernels_mod.LaunchConfig | None:
        """The fused kernels' launch configuration for `rows`, tuned on first use (CUDA); None (with a warning,
        the torch head then runs) when no configuration compiles on this GPU."""
        if rows not in self._launch:
            dev = self.model.embed_tokens.weight.device
            self._launch[rows] = head_kernels_mod.tune(self.model.image_head.net, rows, dev)
            if self._launch[rows] is None:
                log.warning("no fused head kernel launch compiles for %d rows on this GPU: using the torch head", rows)
        return self._launch[rows]

    def compiling(self):
        """Scope for compiled calls: one decode specialisation per cache bucket and batch needs more than
        dynamo's default 8 recompiles; the setting is restored on exit."""
        if not self.compile:
            return contextlib.nullcontext()
        return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64))

    def state(self, key: _Key) -> _State:
        st = self._states.pop(key, None)
        if st is None:
            self._state = None
            while len(self._states) >= self.max_states:
                del self._states[next(iter(self._states))]
            if self.graphs:
                gc.collect()  # a state and its graphs form a reference cycle: free its cache and pools now
                torch.cuda.empty_cache()
            try:
                st = self._build(key)
            except torch.OutOfMemoryError:
                if not self._states:
                    raise
                # The kept states' caches hold the memory: drop them all and build this one alone.
                self._states.clear()
                gc.collect()
                torch.cuda.empty_cache()
                st = self._build(key)
        self._states[key] = self._state = st  # now the most recently used
        return st

    def _build(self, key: _Key) -> _State:
        try:
            with self.compiling():
                return _State(self, key)
        finally:
            self.model.clear_caches()

    def bucket(self, batch: int) -> int:
        """The batch size a call of `batch` images runs at: the smallest bucket that holds it, else itself."""
        return next((b for b in self.batch_buckets if b >= batch), batch)

    @torch.inference_mode()
    def refresh(self) -> None:
        """Re-derive what the engine computed from the model's weights after they changed in place (RL loads each
        step's weights into the same parameters): the fused projections and every kept state's step embeddings,
        written into the same storage, so the captured graphs stay valid and read the new weights."""
        fuse_projections(self.model.layers) or fuse_quantized(self.model.layers)
        time_embed = self.model.image_head.net.time_embed
        for st in self._states.values():
            st.t_embed.copy_(time_embed(st.plan.t.to(st.t_embed.device, st.t_embed.dtype)))

    def key(self, shape: tuple[int, int], settings: FlowSettings, opts, *, n_tokens: int, record=()) -> _Key:
        """The state key of a call with prompt rows of `shape` (R, L)."""
        rows = guidance_rows(opts.cfg, opts.cfg_img)
        if record and rows != 1:
            raise ValueError(f"recording head transitions needs sampling without guidance, got {rows} rows")
        r, n_prefix = shape
        max_len = -(-(n_prefix + n_tokens) // self.kv_block) * self.kv_block
        return _Key(
            r // rows, rows, max_len, settings, opts.cfg_normalize, opts.use_norm, opts.context_noise, tuple(record)
        )

    def prepare(self, shape: tuple[int, int], settings: FlowSettings, opts, *, n_tokens: int) -> None:
        """Build (and keep) the state a call with prompt rows of `shape` (R, L) will use, at its padded batch
        size: caches allocated, head tuned, graphs captured; a server's warm-up."""
        rows = guidance_rows(opts.cfg, opts.cfg_img)
        self.state(self.key((rows * self.bucket(shape[0] // rows), shape[1]), settings, opts, n_tokens=n_tokens))

    @torch.inference_mode()
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        settings: FlowSettings,
        opts,
        *,
        n_tokens: int,
        trace=None,
        record: tuple[int, ...] = (),
    ) -> tuple[_State, int]:
        """Prefill the cache with the prompt rows (R, L) and set the first head condition; leaves the
        state's caches attached to the model (generate detaches them). trace: a pipeline.Trace to fill;
        record: head steps whose transitions the head keeps (Recording)."""
        model = self.model
        dev = model.embed_tokens.weight.device
        r, n_prefix = input_ids.shape
        st = self.state(self.key((r, n_prefix), settings, opts, n_tokens=n_tokens, record=record))
        st.key_valid.fill_(True)
        st.key_valid[:, :n_prefix] = attention_mask.to(dev).bool()
        pos = st.slots[:n_prefix]
        mask = build_attention_mask(st.key_valid, pos, st.slots)
        model.use_caches(st.caches)
        embeds = model.embed(input_ids.to(dev), image_tokens.to(dev))
        hidden = model.forward_hidden(embeds, position_ids=pos.expand(r, -1), mask=mask, slots=pos)
        st.cond.copy_(model.head_condition(hidden[:, -1]))
        if trace is not None:
            trace.input_ids, trace.attention_mask = input_ids.cpu(), attention_mask.cpu()
            trace.inputs_embeds, trace.prefill_hidden = embeds.float().cpu(), hidden.float().cpu()
        return st, n_prefix

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        settings: FlowSettings,
        opts,
        *,
        n_tokens: int,
        seed: int,
        draw=None,
        on_token=None,
        trace=None,
        record: Recording | None = None,
    ) -> torch.Tensor:
        """Tokens (B, n_tokens, D) float32, as fed back (after use_norm).

        Draws: per token, one (num_draws, B, D) normal fill in plan order (initial noise, one eps per
        stochastic step, the context noise); with `draw` given, draw((B, D)) is called that many times in
        that order. on_token(k, tokens (B, k + 1, D)) after each token; trace: a pipeline.Trace to fill;
        record: a Recording whose x, v, x_next this call sets (no guidance). A batch below a bucket runs
        padded with copies of its first image (zero noise); its own rows get the same draws as unpadded.
        """
        steps = () if record is None else record.steps
        rows = guidance_rows(opts.cfg, opts.cfg_img)
        batch = input_ids.shape[0] // rows
        padded = batch if trace is not None else self.bucket(batch)  # a trace records the rows as given
        if padded > batch:
            input_ids, attention_mask, image_tokens = pad_rows(
                input_ids, attention_mask, image_tokens, rows, padded, self.model.config.image_placeholder_id
            )
        try:
            st, n_prefix = self.start(
                input_ids, attention_mask, image_tokens, settings, opts, n_tokens=n_tokens, trace=trace, record=steps
            )
            with self.compiling():
                fill = noise_fill(seed, draw, batch)
                out, rec = self._loop(st, n_prefix, opts, n_tokens, batch, fill, on_token, trace)
        finally:
            self.model.clear_caches()
        if record is not None:
            record.x, record.v, record.x_next = rec[:batch].unbind(3)  # each (B, N, S, D)
        return out[:batch]

    def _loop(self, st: _State, n_prefix: int, opts, n_tokens: int, batch: int, fill, on_token, trace):
        scales = guidance_table(st.key.settings.family, opts, n_tokens).to(st.noise.device)
        out = torch.empty(st.key.batch, n_tokens, st.token.shape[-1], device=st.noise.device)
        rec = torch.empty(st.key.batch, n_tokens, *st.rec.shape[1:], device=st.noise.device)  # (B, N, S, 3, D)
        for k in tqdm(range(n_tokens), desc="image tokens", disable=not opts.progress, leave=False):
            fill(st.noise)
            st.scales.copy_(scales[k])
            if trace is not None:
                trace.conditions.append(st.cond.to("cpu", torch.float32, copy=True))  # (R, d)
            st.head()
            if trace is not None:
                trace.raw_tokens.append(st.raw.to("cpu", copy=True))  # (B, D)
            out[:, k].copy_(st.token)
            rec[:, k].copy_(st.rec)
            if on_token is not None:
                on_token(k, out[:batch, : k + 1])
            if k < n_tokens - 1:
                st.slot.fill_(n_prefix + k)
                st.decode_graph(n_prefix + k)()
        return out, rec


# ---- padding a batch up to its bucket ----------------------------------------------------------------


def pad_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    rows: int,
    batch: int,
    image_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt rows (R, L) = rows x B guidance-major, and the image tokens (N, D) of their placeholders in row
    order -> the same for `batch` >= B images, each guidance branch padded with copies of its first row."""
    b = input_ids.shape[0] // rows
    per_row = (input_ids == image_id).sum(1).tolist()  # placeholders (image tokens) of each row
    chunks = list(image_tokens.split(per_row))
    order = [g * b + i for g in range(rows) for i in (*range(b), *[0] * (batch - b))]  # source row of each
    index = torch.tensor(order, device=input_ids.device)
    tokens = torch.cat([chunks[i] for i in order]) if image_tokens.shape[0] else image_tokens
    return input_ids[index], attention_mask[index.to(attention_mask.device)], tokens


def noise_fill(seed: int, draw, batch: int) -> Callable[[torch.Tensor], None]:
    """A function filling a state's noise (draws, B', D) for one token: rows [:batch] exactly as an unpadded
    call draws them (one normal fill of (draws, batch, D) from the generator seeded with `seed`, or
    `draw((batch, D))` once per draw, in order), the padding rows zero."""
    gen = own = None

    def fill(noise: torch.Tensor) -> None:
        nonlocal gen, own
        if own is None:  # the rows drawn: the state's buffer itself, or one of the unpadded shape (made once)
            own = noise if noise.shape[1] == batch else torch.empty_like(noise[:, :batch])
        if draw is not None:
            own.copy_(torch.stack([draw((batch, noise.shape[-1])) for _ in range(len(noise))]))
        else:
            if gen is None:
                gen = torch.Generator(device=noise.device).manual_seed(seed)
            own.normal_(generator=gen)  # one call: the draws of this token, in order
        if own is not noise:
            noise[:, :batch].copy_(own)
            noise[:, batch:].zero_()

    return fill
