"""Backbone, head and training-loss parity with the official implementation (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from nextstep.model.backbone import build_attention_mask, fuse_projections
from nextstep.model.checkpoint import from_pretrained
from nextstep.model.config import load_config
from nextstep.model.nextstep import build_attention_mask_for_padding, patchify
from tests.refs import dirs_with, layout, max_diff, meta, reference_dirs, tensors

ATOL = 1e-5


@pytest.mark.parametrize("ref", reference_dirs(), ids=lambda p: p.name)
def test_family_detected_from_checkpoint(ref):
    assert load_config(ref / "config.json").family == layout(ref)


@pytest.mark.parametrize("ref", dirs_with("nextstep1"), ids=lambda p: p.name)
def test_nextstep1_lm_forward(ref):
    model = from_pretrained(ref)
    a = tensors(ref, "a_lm_forward.safetensors")
    tokens = patchify(a["latents"], model.config.latent_patch_size)
    assert max_diff(tokens, a["image_tokens_patchified"]) == 0
    with torch.no_grad():
        embeds = model.embed(a["input_ids"], tokens.flatten(0, 1))
        hidden, states = model.forward_hidden(embeds, output_hidden_states=True)
        logits = model.lm_head(hidden)
    assert max_diff(embeds, a["inputs_embeds"]) < ATOL
    for i, state in enumerate(states):
        assert max_diff(state, a[f"hidden_states_{i}"]) < ATOL, i
    assert max_diff(hidden, a["last_hidden_state"]) < ATOL
    assert max_diff(logits, a["logits"]) < ATOL
    assert max_diff(logits[:, -1:], a["logits_last_eval_forward"]) < ATOL


@pytest.mark.parametrize("ref", dirs_with("nextstep1"), ids=lambda p: p.name)
def test_nextstep1_head(ref):
    model = from_pretrained(ref)
    b = tensors(ref, "b_fm_head.safetensors")
    with torch.no_grad():
        cond = model.head_condition(b["cond_hidden"])
        assert max_diff(cond, b["cond_after_image_out_projector"]) < ATOL
        assert max_diff(model.image_head.net.time_embed(b["t"]), b["t_embedding"]) < ATOL
        assert max_diff(model.image_head(b["x_t"], b["t"], cond), b["velocity"]) < ATOL


@pytest.mark.parametrize("ref", dirs_with("nextstep1"), ids=lambda p: p.name)
@pytest.mark.parametrize("replay", [True, False], ids=["recorded-noise", "seeded-rng"])
def test_nextstep1_train_loss(ref, replay):
    """The official NextStep-1 loss conditions the head on the raw hidden state (projector bypassed)."""
    model = from_pretrained(ref)
    c = tensors(ref, "c_train_loss.safetensors")
    seed = meta(ref)["c_train_loss"]["rng_seed_before_forward"]
    tokens = patchify(c["latents"], model.config.latent_patch_size)
    mask = c["latents_mask"].repeat_interleave(tokens.shape[1])
    noise = dict(fm_noise=c["fm_noise"], fm_t=c["fm_t"]) if replay else {}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.forward_train(
            c["input_ids"], c["labels"], tokens.flatten(0, 1), image_token_mask=mask, project_condition=False, **noise
        )
    assert max_diff(out.lm_loss, c["lm_loss"][0]) < ATOL
    assert max_diff(out.im_loss, c["im_loss"][0]) < ATOL
    assert max_diff(out.loss, c["loss"][0]) < ATOL


@pytest.mark.parametrize("ref", dirs_with("nextstep11"), ids=lambda p: p.name)
def test_nextstep11_backbone_left_padded(ref):
    model = from_pretrained(ref)
    a = tensors(ref, "backbone.safetensors")
    tokens = patchify(a["a.latents"], model.config.latent_patch_size)
    assert max_diff(tokens, a["a.patch_tokens"]) == 0
    valid = a["a.attention_mask"].bool()
    with torch.no_grad():
        embeds = model.embed(a["a.input_ids"], tokens.flatten(0, 1))
        hidden = model.forward_hidden(embeds, mask=build_attention_mask_for_padding(a["a.attention_mask"]))
        row0 = model.forward_hidden(model.embed(a["a.input_ids"][:1], tokens[0]))
    assert max_diff(embeds, a["a.inputs_embeds"]) < ATOL
    assert max_diff(hidden[valid], a["a.last_hidden_state"][valid]) < ATOL
    assert max_diff(model.lm_head(hidden)[valid], a["a.logits"][valid]) < ATOL
    assert max_diff(row0, a["a.row0.last_hidden_state"]) < ATOL
    assert max_diff(model.lm_head(row0), a["a.row0.logits"]) < ATOL


@pytest.mark.parametrize("ref", dirs_with("nextstep11"), ids=lambda p: p.name)
def test_nextstep11_head(ref):
    model = from_pretrained(ref)
    b = tensors(ref, "head.safetensors")
    net = model.image_head.net
    with torch.no_grad():
        cond = model.head_condition(b["b.c"].squeeze(1))
        assert max_diff(cond, b["b.c_projected"]) < ATOL
        assert max_diff(net.time_embed(b["b.t"]), b["b.time_embed"]) < ATOL
        assert max_diff(net.cond_embed(cond), b["b.cond_embed"]) < ATOL
        assert max_diff(net.input_proj(b["b.x"]), b["b.input_proj"]) < ATOL
        v = net(b["b.x"], b["b.t"], cond)
    for key in ("b.velocity_net", "b.velocity_forward_head", "b.velocity_forward_head_via_forward"):
        assert max_diff(v, b[key]) < ATOL, key


def test_kv_cache_decode_equals_full_forward():
    """Prefill a left-padded prefix then decode token by token with the static cache: same hidden states."""
    ref = reference_dirs()[0]
    model = from_pretrained(ref)
    torch.manual_seed(0)
    b, n, extra = 2, 7, 5
    embeds = torch.randn(b, n + extra, model.config.hidden_size)
    attn = torch.ones(b, n + extra, dtype=torch.long)
    attn[1, :3] = 0  # left padding on row 1
    with torch.no_grad():
        full = model.forward_hidden(embeds, mask=build_attention_mask_for_padding(attn))
        model.setup_caches(b, n + extra)
        slots = torch.arange(n + extra)
        valid = attn.bool()
        pos = slots[:n]
        out = [
            model.forward_hidden(
                embeds[:, :n], position_ids=pos.expand(b, -1), mask=build_attention_mask(valid, pos, slots), slots=pos
            )
        ]
        for k in range(n, n + extra):
            s = slots[k : k + 1]
            out.append(
                model.forward_hidden(
                    embeds[:, k : k + 1],
                    position_ids=s.expand(b, 1),
                    mask=build_attention_mask(valid, s, slots),
                    slots=s,
                )
            )
        model.clear_caches()
    cached = torch.cat(out, dim=1)
    assert max_diff(cached[valid], full[valid]) < 1e-5


def test_fused_projections_same_output_and_state_dict():
    """fuse_projections adds inference copies only: same hidden states, same state_dict, same parameters."""
    model = from_pretrained(reference_dirs()[0])
    embeds = torch.randn(2, 6, model.config.hidden_size)
    keys, params = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        plain = model.forward_hidden(embeds)
        assert fuse_projections(model.layers)
        fused = model.forward_hidden(embeds)
    assert model.layers[0].self_attn.qkv_proj is not None and model.layers[0].mlp.gate_up_proj is not None
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == params
    assert max_diff(fused, plain) < 1e-5
