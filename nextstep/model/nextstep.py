"""The NextStep model: a causal decoder over text tokens and continuous image tokens.

Text rows are predicted by `lm_head`; the hidden state before each image token, through
`image_out_projector`, conditions the flow-matching `image_head`. Parameter names equal the
official checkpoints' (no `model.` prefix).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.model.backbone import DecoderLayer, KVCache, RMSNorm, build_attention_mask, rope_cos_sin
from nextstep.model.config import NextStepConfig
from nextstep.model.head import FlowMatchingHead


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p); token order row-major, feature index c*p*p + dy*p + dx."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p) for a token grid of h rows and w columns."""
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, h, w, c, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE-style 2-D sin-cos table (1, grid*grid, dim); NextStep-1 checkpoints store it as `gen_pos_embed`."""

    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gh, gw = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="xy"
    )
    emb = torch.cat([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], dim=1)
    return emb.float()[None]


class LossOutput(NamedTuple):
    """A NamedTuple, so FSDP2 finds the tensors in forward_train's output and hooks their backward."""

    loss: torch.Tensor  # lm_loss_weight * lm_loss + im_loss_weight * im_loss
    lm_loss: torch.Tensor  # mean text cross-entropy
    im_loss: torch.Tensor  # masked flow-matching MSE


class NextStep(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.image_in_projector = nn.Linear(cfg.token_dim, cfg.hidden_size)
        self.image_out_projector = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.image_head = FlowMatchingHead(cfg.token_dim, cfg.hidden_size, cfg.fm_head_dim, cfg.fm_head_layers)
        if cfg.family == "nextstep1":
            # Stored by NextStep-1 checkpoints; unused while use_gen_pos_embed is off (all releases).
            self.register_buffer("gen_pos_embed", sincos_2d(cfg.hidden_size, cfg.base_image_grid_size))

    # ---- weights -------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh init: normal(std) linears/embeddings, unit norms, zero biases, DiT-style zero adaLN."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.image_head.net.init_weights()

    # ---- inference state -----------------------------------------------------------------------
    def setup_caches(self, max_batch: int, max_len: int) -> list[KVCache]:
        """Attach a fresh static KV cache of (max_batch, max_len) to every layer; returned so that its
        holder can attach it again later (use_caches)."""
        p = self.embed_tokens.weight
        c = self.config
        caches = [
            KVCache(max_batch, max_len, c.num_key_value_heads, c.head_dim, dtype=p.dtype, device=p.device)
            for _ in self.layers
        ]
        self.use_caches(caches)
        return caches

    def use_caches(self, caches: list[KVCache] | None) -> None:
        """Attach one cache per layer (None: none, the training forward)."""
        for i, layer in enumerate(self.layers):
            layer.self_attn.cache = None if caches is None else caches[i]

    def clear_caches(self) -> None:
        self.use_caches(None)

    # ---- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, L, d); placeholder positions take image_in_projector(image_tokens)
        in order (row by row, raster order inside each image). image_tokens: (N, token_dim)."""
        is_image = input_ids == self.config.image_placeholder_id
        embeds = self.embed_tokens(input_ids.masked_fill(is_image, 0))
        if image_tokens is not None and image_tokens.shape[0]:
            projected = self.image_in_projector(image_tokens.to(embeds.dtype))
            embeds = embeds.masked_scatter(is_image[..., None], projected.to(embeds.dtype))
        return embeds

    def forward_hidden(
        self,
        inputs_embeds: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        layer_fn=None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normed hidden states (B, L, d).

        position_ids (B, L) default 0..L-1; mask: boolean (B, 1, L, Lk) or None for plain causal;
        slots (L,): cache slots to write when caches are set up (see setup_caches); then attention reads
        the first Lk cache slots, so a decode step's mask may cover only the live prefix.
        layer_fn(layer, x, cos, sin, mask, slots): how each layer is called, default its forward (an
        engine passes a compiled DecoderLayer.forward).
        """
        b, n, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=inputs_embeds.device).expand(b, n)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        states = [x]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, slots) if layer_fn is None else layer_fn(layer, x, cos, sin, mask, slots)
            states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            states[-1] = x
            return x, states
        return x

    def forward_train(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        image_tokens: torch.Tensor,
        *,
        image_token_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        project_condition: bool = True,
        fm_noise: torch.Tensor | None = None,
        fm_t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        image_inputs: torch.Tensor | None = None,
    ) -> LossOutput:
        """Training losses (SPEC §2).

        input_ids, labels: (B, L), labels -100 where no text loss is wanted; image_tokens (N, token_dim)
        are the targets for the placeholders in order; image_token_mask (N,) drops some from the loss;
        attention_mask: boolean (B, 1, L, L) for packed/padded batches, None for plain causal.
        Rows whose next token is a placeholder go to the flow head, all others to lm_head + CE.
        project_condition=False conditions the head on the raw hidden state (the NextStep-1 training
        code did; inference always projects, so we train with the projection). image_inputs (N, token_dim):
        what the backbone reads at the placeholders instead of image_tokens (e.g. noised); targets unchanged.
        """
        inputs = image_tokens if image_inputs is None else image_inputs
        hidden = self.forward_hidden(self.embed(input_ids, inputs), position_ids=position_ids, mask=attention_mask)
        hidden, next_ids, next_labels = hidden[:, :-1], input_ids[:, 1:], labels[:, 1:]
        to_head = next_ids == self.config.image_placeholder_id  # (B, L-1)
        text_rows = ~to_head & (next_labels != -100)
        logits = self.lm_head(hidden[text_rows])
        if logits.shape[0]:
            lm_loss = F.cross_entropy(logits.float(), next_labels[text_rows])
        else:
            lm_loss = hidden.sum() * 0.0
        cond = hidden[to_head]  # (N, d)
        if project_condition:
            cond = self.image_out_projector(cond)
        if image_token_mask is None:
            image_token_mask = torch.ones(image_tokens.shape[0], device=image_tokens.device)
        im_loss = self.image_head.loss(
            image_tokens.to(cond.dtype),
            cond,
            image_token_mask,
            batch_mul=self.config.fm_head_batch_mul,
            noise=fm_noise,
            t=fm_t,
            generator=generator,
        )
        c = self.config
        return LossOutput(c.lm_loss_weight * lm_loss + c.im_loss_weight * im_loss, lm_loss, im_loss)

    def head_condition(self, hidden: torch.Tensor) -> torch.Tensor:
        """Condition z of the flow head from backbone hidden states (..., d)."""
        return self.image_out_projector(hidden)


def build_attention_mask_for_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 padding mask -> boolean causal SDPA mask (B, 1, L, L)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return build_attention_mask(attention_mask.bool(), pos, pos)
