"""Model initialisation for training (Qwen2-style LM dir, freezing, per-module learning rates) and
gradient accumulation."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nextstep.model.checkpoint import build_model
from nextstep.model.config import NextStepConfig
from nextstep.model.tokenizer import TextTokenizer
from nextstep.train import loop
from nextstep.train.config import apply_overrides
from nextstep.train.init import init_model, resolve_arch, set_trainable
from nextstep.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import ARCH, latent_batches, tiny_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # as in test_loop


def test_init_from_lm_dir_strips_prefix_and_keeps_image_modules_fresh(tmp_path):
    lm = build_model(NextStepConfig(**ARCH, vocab_size=400), seed=5)  # smaller LM vocabulary
    state = {
        ("" if k == "lm_head.weight" else "model.") + k: v
        for k, v in lm.state_dict().items()
        if not k.startswith("image_")
    }
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    cfg = apply_overrides(tiny_cfg(tmp_path / "run"), ["model.init=lm", f"model.path={tmp_path}"])
    arch = resolve_arch(cfg, TextTokenizer(cfg.model.tokenizer_dir))
    model = init_model(cfg, arch)
    assert model.embed_tokens.weight.shape[0] == 448
    torch.testing.assert_close(model.embed_tokens.weight[:400], lm.embed_tokens.weight)
    torch.testing.assert_close(model.layers[1].mlp.down_proj.weight, lm.layers[1].mlp.down_proj.weight)
    fresh = build_model(arch, seed=cfg.training.seed)
    torch.testing.assert_close(model.image_in_projector.weight, fresh.image_in_projector.weight)

    bad = apply_overrides(cfg, ["model.arch.hidden_size=64", "model.arch.intermediate_size=64"])
    with pytest.raises(ValueError, match="LM parameter 'embed_tokens.weight' has shape \\(400, 32\\)"):
        init_model(bad, bad.model.arch)


def test_train_modules_freeze_the_rest_and_module_lr_groups(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=4, save_steps=0)  # zero-init adaLN: projectors move from step 3
    cfg = apply_overrides(
        cfg,
        [
            'training.train_modules=["image_head", "image_in_projector", "image_out_projector"]',
            'optim.module_lr={"image_head": 10}',
        ],
    )
    arch = resolve_arch(cfg, TextTokenizer(cfg.model.tokenizer_dir))
    model = init_model(cfg, arch)
    set_trainable(model, cfg.training.train_modules)
    opt = build_optimizer(model, cfg)
    assert sorted({g["lr_mult"] for g in opt.param_groups}) == [1.0, 10.0]
    assert not model.embed_tokens.weight.requires_grad and model.image_head.net.parameters().__next__().requires_grad
    with pytest.raises(ValueError, match="names no module"):
        set_trainable(model, ["image_heads"])
    with pytest.raises(ValueError, match="'layers.0.self_atn' names no module"):  # below the top level too
        set_trainable(model, ["layers.0.self_atn"])
    set_trainable(model, ["layers.0.self_attn", "norm.weight"])  # sub-modules and single parameters
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == [
        "layers.0.self_attn.k_proj.bias",
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.o_proj.weight",
        "layers.0.self_attn.q_proj.bias",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.v_proj.bias",
        "layers.0.self_attn.v_proj.weight",
        "norm.weight",
    ]
    set_trainable(model, cfg.training.train_modules)
    with pytest.raises(ValueError, match="match no trainable parameter"):
        build_optimizer(model, apply_overrides(cfg, ['optim.module_lr={"layers": 2}']))

    before = {k: v.clone() for k, v in build_model(arch, seed=0).state_dict().items()}
    loop.train(cfg, data=latent_batches(4, 2))
    from nextstep.train.checkpoint import load_model_weights

    after = build_model(arch, seed=1)
    load_model_weights(tmp_path / "checkpoints/step-00000004", after)
    for name, value in after.state_dict().items():
        same = torch.equal(value, before[name])
        assert same == (not name.startswith("image_")), name


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    big = loop.train(tiny_cfg(tmp_path / "big", max_steps=3, save_steps=0), data=latent_batches(3, 4))
    cfg = apply_overrides(tiny_cfg(tmp_path / "acc", max_steps=3, save_steps=0), ["training.grad_accum_steps=2"])
    halves = [half for b in latent_batches(3, 4) for half in (b[:2], b[2:])]
    acc = loop.train(cfg, data=halves)
    for a, b in zip(big, acc, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
