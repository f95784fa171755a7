"""Fast image-token decoding: static KV cache, guidance rows in one batch, and each token's work replayed
as two CUDA graphs (the whole flow-matching loop over all steps and branches; one backbone step).

Same semantics as `Pipeline.generate_tokens`:
    tokens = generate_tokens_fast(pipe, input_ids, attention_mask, image_tokens, settings, opts, seed=0)
On CPU the same code runs eagerly (no graphs); that is what CI compares with the eager pipeline.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.model.backbone import KVCache, apply_rope, build_attention_mask, rope_cos_sin
from nextstep.model.head import AdaLNMLP
from nextstep.model.nextstep import NextStep
from nextstep.sampling import head_kernels as head_kernels_mod
from nextstep.sampling.flow import FlowSettings, combine_guidance, guidance_rows, guidance_table, plan_steps

QUANTIZE = ("none", "int8", "fp8")


# ---- the flow head at decode time ----------------------------------------------------------------
def head_modulations(net: AdaLNMLP, t_embed: torch.Tensor, cond: torch.Tensor) -> list[tuple]:
    """adaLN shift/scale/gate of every block for every step at once, each (S, R, W).

    They depend on (t, cond) only, so one batched GEMM per block replaces S small ones: the head reads
    its adaLN weights (57% of its bytes) once per token instead of once per step.
    """
    y = t_embed[:, None] + net.cond_embed(cond)[None]  # (S, R, W)
    mods = []
    for block in net.res_blocks:
        shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
        # chunk() gives strided views; contiguous copies (once per token) let the S steps' addcmuls vectorise.
        mods.append((shift.contiguous(), 1 + scale, gate.contiguous()))
    shift, scale = net.final_layer.adaLN_modulation(y).chunk(2, dim=-1)
    mods.append((shift.contiguous(), 1 + scale))
    return mods


def head_velocity(net: AdaLNMLP, x: torch.Tensor, mods: list[tuple], i: int, rows: int) -> torch.Tensor:
    """net(x, t_i, cond) for tokens x (B, D) shared by all guidance rows -> (rows * B, D) float32."""
    dtype = net.input_proj.weight.dtype
    h = net.input_proj(x.to(dtype)).repeat(rows, 1)  # (R, W)
    for block, (shift, scale1, gate) in zip(net.res_blocks, mods, strict=False):
        h = torch.addcmul(h, gate[i], block.mlp(torch.addcmul(shift[i], block.in_ln(h), scale1[i])))
    shift, scale1 = mods[-1]
    final = net.final_layer
    return final.linear(torch.addcmul(shift[i], final.norm_final(h), scale1[i])).float()


def head_step(
    velocity,
    net: AdaLNMLP,
    x: torch.Tensor,
    mods: list[tuple],
    i: int,
    rows: int,
    scales: torch.Tensor,
    eps: torch.Tensor | None,
    a: float,
    b: float,
    *,
    normalize: bool,
) -> torch.Tensor:
    """One step of the head loop with torch ops: x (B, D) fp32 -> (eps +) a x + b guide(velocity(x, t_i)).
    head_kernels.head_step is the same step as fused kernels."""
    v = combine_guidance(velocity(net, x, mods, i, rows), scales[0], scales[1], rows, normalize=normalize)
    x = x * a if eps is None else torch.add(eps, x, alpha=a)
    return x.add_(v, alpha=b)


# ---- one backbone step with the static cache ---------------------------------------------------
def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """backbone.RMSNorm's exact arithmetic (fp32 norm, cast, then weight) in 4 kernels instead of 8."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=norm.eps).to(x.dtype) * norm.weight


def decode_layer(layer, cache: KVCache, x, cos, sin, mask, slot, kv_len: int, fused=None) -> torch.Tensor:
    """One decoder layer for one new position per row, x (R, 1, d).

    GQA without repeat_interleave: the `rep` query heads of one KV head become `rep` queries against
    it, so K and V are read once, and only the first kv_len slots (a static bucket) are read.
    fused: (w_qkv, b_qkv, w_gate_up) from fuse_projections, or None to call the layer's linears.
    """
    attn, mlp, r = layer.self_attn, layer.mlp, x.shape[0]
    h, hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    y = rms_norm(layer.input_layernorm, x)
    if fused is None:
        qkv = torch.cat([attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)], dim=-1)
    else:
        qkv = F.linear(y, fused[0], fused[1])
    qkv = qkv.view(r, h + 2 * hkv, 1, hd)  # (R, H + 2 Hkv, 1, D): [q heads, k heads, v heads]
    qk = apply_rope(qkv[:, : h + hkv], cos, sin)  # rotate q and k in one pass
    q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + hkv :]
    cache.update(slot, k, v)
    q = q.reshape(r, hkv, -1, hd)  # (R, Hkv, rep, D)
    scores = (q @ cache.k[:, :, :kv_len].transpose(-1, -2)).float() * hd**-0.5  # (R, Hkv, rep, L)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(x.dtype)
    out = probs @ cache.v[:, :, :kv_len]  # (R, Hkv, rep, D)
    x = x + attn.o_proj(out.reshape(r, 1, -1))
    y = rms_norm(layer.post_attention_layernorm, x)
    if fused is None:
        return x + mlp(y)
    gate, up = F.linear(y, fused[2]).chunk(2, dim=-1)
    return x + mlp.down_proj(F.silu(gate) * up)


def fuse_projections(model: NextStep) -> list[tuple] | None:
    """Concatenate each layer's q/k/v and gate/up weights into one matrix and re-point the original
    parameters at views of it (values unchanged, no extra memory): one GEMM instead of three (two).
    None when the layers hold other modules (quantised) or biases the fused form does not carry."""
    out = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        if any(type(lin) is not nn.Linear for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)):
            return None
        if m.gate_proj.bias is not None or (a.q_proj.bias is None) != (a.v_proj.bias is None):
            return None
        w_qkv = _concat([a.q_proj, a.k_proj, a.v_proj], "weight")
        b_qkv = _concat([a.q_proj, a.k_proj, a.v_proj], "bias") if a.q_proj.bias is not None else None
        out.append((w_qkv, b_qkv, _concat([m.gate_proj, m.up_proj], "weight")))
    return out


def _concat(modules: list[nn.Module], name: str) -> torch.Tensor:
    parts = [getattr(mod, name) for mod in modules]
    whole = torch.cat([p.detach() for p in parts])
    offset = 0
    for mod, p in zip(modules, parts, strict=True):
        setattr(mod, name, nn.Parameter(whole[offset : offset + p.shape[0]], requires_grad=p.requires_grad))
        offset += p.shape[0]
    return whole


def decode_step(
    model: NextStep,
    caches: list[KVCache],
    x: torch.Tensor,
    slot: torch.Tensor,
    key_valid: torch.Tensor,
    kv_len: int,
    layer_fn=decode_layer,
    fused: list[tuple] | None = None,
) -> torch.Tensor:
    """Embeddings x (R, d) at cache slot `slot` (1,) -> final hidden (R, d), attending to kv_len slots."""
    cfg = model.config
    cos, sin = rope_cos_sin(slot.expand(x.shape[0], 1), cfg.head_dim, cfg.rope_theta, x.dtype)  # (R,1,1,D)
    k_pos = torch.arange(kv_len, device=x.device)
    mask = (key_valid[:, :kv_len] & (k_pos <= slot))[:, None, None]  # (R, 1, 1, kv_len)
    x = x[:, None]  # (R, 1, d)
    for i, (layer, cache) in enumerate(zip(model.layers, caches, strict=True)):
        x = layer_fn(layer, cache, x, cos, sin, mask, slot, kv_len, None if fused is None else fused[i])
    return rms_norm(model.norm, x)[:, 0]


# ---- weight-only quantisation, applied from outside the model ----------------------------------
class QuantLinear(nn.Module):
    """Linear with int8 or fp8 (e4m3) weights and one scale per output channel; dequantised per call.

    Halves weight memory. Without a fused dequant-GEMM kernel it does not cut bytes moved per call.
    """

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        if mode == "int8":
            scale = amax / 127
            q = (w / scale).round().clamp(-127, 127).to(torch.int8)
        else:
            scale = amax / torch.finfo(torch.float8_e4m3fn).max
            q = (w / scale).to(torch.float8_e4m3fn)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale[:, 0].to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return out if self.bias is None else out + self.bias


def apply_quantization(model: NextStep, mode: str) -> NextStep:
    """Swap the decoder layers' and the flow head's linears for weight-only int8/fp8 ones, in place."""
    if mode not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {mode!r}")
    if mode == "none":
        return model
    for root in (model.layers, model.image_head.net):
        for module in list(root.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, QuantLinear(child, mode))
    return model


# ---- the engine --------------------------------------------------------------------------------
class _Graph:
    """`fn` (which writes static outputs) captured once as a CUDA graph, or called directly on CPU."""

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


class _State:
    """Static buffers, KV cache and captured graphs for one _Key."""

    def __init__(self, engine: Engine, key: _Key):
        self.model, self.key = model, key = engine.model, key
        cfg, p = model.config, model.embed_tokens.weight
        dev, dtype, r = p.device, p.dtype, key.rows * key.batch
        self.plan = plan = plan_steps(key.settings)
        self.caches = [
            KVCache(r, key.max_len, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, device=dev)
            for _ in model.layers
        ]
        self.key_valid = torch.ones(r, key.max_len, dtype=torch.bool, device=dev)
        self.slot = torch.full((1,), key.max_len - 1, dtype=torch.long, device=dev)  # harmless warm-up slot
        self.cond = torch.zeros(r, cfg.hidden_size, dtype=dtype, device=dev)  # (R, d) head condition
        # (draws, B, D): the head's draws in the eager order, then the fed-back token's noise if any
        draws = plan.num_draws + (1 if key.context_noise else 0)
        self.noise = torch.zeros(draws, key.batch, cfg.token_dim, device=dev)
        self.scales = torch.ones(2, device=dev)  # this token's (cfg, cfg_img)
        self.token = torch.zeros(key.batch, cfg.token_dim, device=dev)  # (B, D) fed-back token
        with torch.inference_mode():
            self.t_embed = model.image_head.net.time_embed(plan.t.to(dev, dtype))  # (S, W), every token
        self.coef_eps = torch.tensor([c for _, _, c in plan.coef[: plan.num_eps]], device=dev)[:, None, None]
        self.fused = engine.fused
        self.head_kernels = engine.use_head_kernels(r)
        if self.head_kernels:
            head_kernels_mod.tune(model.image_head.net, r, dev)
            self.step = head_kernels_mod.head_step
        else:
            velocity = torch.compile(head_velocity, dynamic=False) if engine.compile else head_velocity
            self.step = partial(head_step, velocity)
        self.layer_fn = torch.compile(decode_layer, dynamic=False) if engine.compile else decode_layer
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
        """Integrate one token per image over all steps and guidance branches -> self.token."""
        net, plan, key = self.model.image_head.net, self.plan, self.key
        mods = head_modulations(net, self.t_embed, self.cond)
        eps = self.noise[1 : plan.num_draws] * self.coef_eps  # (num_eps, B, D): c * eps per noisy step
        x = self.noise[0]
        for i, (a, b, _) in enumerate(plan.coef):
            e = eps[i] if i < plan.num_eps else None
            x = self.step(net, x, mods, i, key.rows, self.scales, e, a, b, normalize=key.normalize)
        if key.use_norm:
            x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        self.token.copy_(x)

    @torch.inference_mode()
    def _decode(self, kv_len: int) -> None:
        """Feed self.token back at self.slot -> self.cond for the next token."""
        model = self.model
        token = self.token + self.key.context_noise * self.noise[-1] if self.key.context_noise else self.token
        x = model.image_in_projector(token.to(self.cond.dtype)).repeat(self.key.rows, 1)  # (R, d)
        hidden = decode_step(model, self.caches, x, self.slot, self.key_valid, kv_len, self.layer_fn, self.fused)
        self.cond.copy_(model.head_condition(hidden))

    def decode_graph(self, slot: int) -> _Graph:
        """The smallest captured bucket whose kv_len covers `slot`."""
        return next(g for kv, g in self.decode.items() if kv > slot)


class Engine:
    """Holds one model's captured states; `generate` has Pipeline.generate_tokens' semantics."""

    def __init__(
        self,
        model: NextStep,
        *,
        graphs: bool | None = None,
        compile: bool = False,
        head_kernels: bool | None = None,
        kv_block: int = 256,
    ):
        dev = model.embed_tokens.weight.device
        self.model = model
        self.graphs = dev.type == "cuda" if graphs is None else graphs  # capture CUDA graphs
        self.compile = compile  # torch.compile the decode step (and the torch head ops) before capture
        if compile:  # one decode graph per cache bucket and batch: more specialisations than the default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # Fused Triton head blocks (head_kernels.py); None: on wherever Triton can run them.
        self.head_kernels = head_kernels_mod.available(dev) if head_kernels is None else head_kernels
        self.kv_block = kv_block  # cache length granularity: one decode graph per kv_block slots
        self._state: _State | None = None  # one at a time: a batch-32 cache is ~14 GB at 14B
        self.fused = fuse_projections(model)

    def use_head_kernels(self, rows: int) -> bool:
        """Fused head kernels for `rows` guidance rows x images (small batches, where launches dominate)."""
        return self.head_kernels and rows <= head_kernels_mod.MAX_ROWS

    def _fused_live(self) -> bool:
        """The fused matrices still back the model's parameters (no .to() or swap since fusing)."""
        q = self.model.layers[0].self_attn.q_proj.weight
        return q.untyped_storage().data_ptr() == self.fused[0][0].untyped_storage().data_ptr()

    def state(self, key: _Key) -> _State:
        if self.fused is not None and not self._fused_live():
            self.fused, self._state = fuse_projections(self.model), None  # weights were replaced (.to, reload)
        if self._state is None or self._state.key != key:
            self._state = None
            if self.graphs:
                gc.collect()  # a state and its graphs form a reference cycle: free its cache and pools now
                torch.cuda.empty_cache()
            self._state = _State(self, key)
        return self._state

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
    ) -> tuple[_State, int]:
        """Prefill the cache with the prompt rows (R, L) and set the first head condition."""
        model = self.model
        dev = model.embed_tokens.weight.device
        rows = guidance_rows(opts.cfg, opts.cfg_img)
        r, n_prefix = input_ids.shape
        max_len = -(-(n_prefix + n_tokens) // self.kv_block) * self.kv_block
        key = _Key(r // rows, rows, max_len, settings, opts.cfg_normalize, opts.use_norm, opts.context_noise)
        st = self.state(key)
        st.key_valid.fill_(True)
        st.key_valid[:, :n_prefix] = attention_mask.to(dev).bool()
        slots = torch.arange(max_len, device=dev)
        pos = slots[:n_prefix]
        mask = build_attention_mask(st.key_valid, pos, slots)
        for layer, cache in zip(model.layers, st.caches, strict=True):
            layer.self_attn.cache = cache
        try:
            embeds = model.embed(input_ids.to(dev), image_tokens.to(dev))
            hidden = model.forward_hidden(embeds, position_ids=pos.expand(r, -1), mask=mask, slots=pos)
        finally:
            model.clear_caches()
        st.cond.copy_(model.head_condition(hidden[:, -1]))
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
    ) -> torch.Tensor:
        st, n_prefix = self.start(input_ids, attention_mask, image_tokens, settings, opts, n_tokens=n_tokens)
        scales = guidance_table(settings.family, opts, n_tokens).to(st.noise.device)
        if draw is None:
            gen = torch.Generator(device=st.noise.device).manual_seed(seed)
        out = torch.empty(st.key.batch, n_tokens, st.token.shape[-1], device=st.noise.device)
        for k in range(n_tokens):
            if draw is None:
                st.noise.normal_(generator=gen)  # one call: the eager draws of this token, in order
            else:
                st.noise.copy_(torch.stack([draw(tuple(st.token.shape)) for _ in range(len(st.noise))]))
            st.scales.copy_(scales[k])
            st.head()
            out[:, k].copy_(st.token)
            if on_token is not None:
                on_token(k, out[:, : k + 1])
            if k < n_tokens - 1:
                st.slot.fill_(n_prefix + k)
                st.decode_graph(n_prefix + k)()
        return out


_ENGINES: weakref.WeakKeyDictionary[NextStep, Engine] = weakref.WeakKeyDictionary()


def engine_for(model: NextStep, *, compile: bool = False) -> Engine:
    """The model's cached Engine; asking for the other `compile` setting replaces it (one state at a time)."""
    if model not in _ENGINES or _ENGINES[model].compile != compile:
        _ENGINES.pop(model, None)
        gc.collect()
        _ENGINES[model] = Engine(model, compile=compile)
    return _ENGINES[model]


def generate_tokens_fast(
    pipe,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    settings: FlowSettings,
    opts,
    *,
    seed: int,
    draw=None,
    on_token=None,
) -> torch.Tensor:
    """Drop-in for Pipeline.generate_tokens (no trace): same rows, prefill, guidance and draws.

    Draws: per token, one (num_draws, B, D) normal fill in the eager order (initial noise, then one eps
    per stochastic step); with `draw` given, draw((B, D)) is called num_draws times in that order.
    """
    n_tokens = (opts.size[0] // pipe.down_factor) * (opts.size[1] // pipe.down_factor)
    return engine_for(pipe.model, compile=opts.engine == "compiled").generate(
        input_ids,
        attention_mask,
        image_tokens,
        settings,
        opts,
        n_tokens=n_tokens,
        seed=seed,
        draw=draw,
        on_token=on_token,
    )
