"""Config tree: dotted overrides and their errors, presets, JSON round trip, show/diff/eshow."""

import json

import pytest
import torch

from nextstep.assets import BUILTIN_MODEL
from nextstep.model.config import load_config
from nextstep.model.nextstep import NextStep
from nextstep.model.tokenizer import TextTokenizer
from nextstep.train import config as C
from nextstep.train.config import TrainConfig, apply_overrides, diff, from_dict, load_preset, to_dict
from nextstep.train.init import resolve_arch, set_trainable
from nextstep.train.optim import lr_factor

PRESETS = [
    "debug",
    "shapes",
    "shapes_stage2",
    "shapes_stage3",
    "shapes_stage3_attn",
    "shapes_stage4",
    "nextstep_1b",
    "nextstep_qwen14b_256px",
    "nextstep_qwen14b_512px",
]


def test_overrides_set_nested_typed_values():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "training.max_steps=1000",
            "training.save_steps=200",
            "data.num_workers=2",
            "optim.lr=3e-4",
            "optim.warmup_steps=10",
            "training.resume=true",
            "model.arch.hidden_size=128",
            'training.train_modules=["image_head","image_in_projector"]',
            'optim.module_lr={"image_head": 10}',
            "logging.run_name=my run",
            'data.datasets=[{"shards": "a-{0..3}.tar", "weight": 2}]',
        ],
    )
    assert (cfg.training.max_steps, cfg.training.save_steps, cfg.data.num_workers) == (1000, 200, 2)
    assert cfg.optim.lr == 3e-4 and cfg.training.resume is True and cfg.model.arch.hidden_size == 128
    assert cfg.training.train_modules == ["image_head", "image_in_projector"]
    assert cfg.optim.module_lr == {"image_head": 10.0} and cfg.logging.run_name == "my run"
    assert cfg.data.datasets[0].weight == 2 and cfg.data.datasets[0].shards == "a-{0..3}.tar"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_step=5", "unknown config key 'training.max_step'"),
        ("trainin.max_steps=5", "unknown config key 'trainin'"),
        ("model.arch.hidden=5", "unknown config key 'model.arch.hidden'"),
        ("training.max_steps=ten", "training.max_steps: expected an integer, got 'ten'"),
        ("training.max_steps=1.5", "training.max_steps: expected an integer"),
        ("training.resume=yes", "training.resume: expected true/false"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("training.train_modules=image_head", "training.train_modules: expected a JSON list"),
        ("training.max_steps", "not of the form key=value"),
        ("training.max_steps=0", "training.max_steps must be >= 1, got 0"),
        ("optim.schedule=linear", "optim.schedule must be cosine, constant or wsd, got 'linear'"),
        ("optim.decay_steps=-1", "optim.decay_steps must be >= 0, got -1"),
        ("parallel.param_dtype=fp8", "parallel.param_dtype must be one of"),
        ("model.init=pretrained", "model.init='pretrained' needs model.path"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(TrainConfig(), [override])


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip_json(name):
    cfg = load_preset(name)
    assert load_preset(f"configs.{name}") is cfg
    assert load_preset(f"configs/{name}.py").training.max_steps == cfg.training.max_steps
    again = from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg))))
    assert to_dict(again) == to_dict(cfg)
    assert diff(cfg, again) == []


def test_shapes_stage2_changes_only_what_its_docstring_names():
    changed = {line.split(":")[0] for line in diff(load_preset("shapes"), load_preset("shapes_stage2"))}
    assert changed == {
        "data.batch_size", "data.datasets", "data.num_workers", "model.init", "model.path", "optim.decay_steps",
        "optim.warmup_steps", "training.image_input_noise", "training.max_steps", "training.output_dir",
        "training.save_steps",
    }  # fmt: skip
    stage2 = load_preset("shapes_stage2")
    assert stage2.training.image_input_noise == 1.0 and stage2.model.path == "runs/shapes/stage1"
    assert load_preset("shapes").training.image_input_noise == 0.0  # stage 1 is untouched by the replace


def test_shapes_stage3_changes_only_what_its_docstring_names():
    changed = {line.split(":")[0] for line in diff(load_preset("shapes_stage2"), load_preset("shapes_stage3"))}
    assert changed == {
        "data.datasets", "model.path", "optim.decay_steps", "training.image_input_noise", "training.max_steps",
        "training.output_dir", "training.save_steps",
    }  # fmt: skip
    stage3 = load_preset("shapes_stage3")
    assert stage3.training.image_input_noise == 2.0 and stage3.model.path == "runs/shapes/stage2"
    assert (stage3.training.max_steps, stage3.optim.decay_steps, stage3.data.batch_size) == (8369, 3056, 1024)
    assert load_preset("shapes_stage2").training.image_input_noise == 1.0


def test_shapes_stage3_attn_trains_only_the_attention_side_of_stage_2():
    changed = {line.split(":")[0] for line in diff(load_preset("shapes_stage2"), load_preset("shapes_stage3_attn"))}
    assert changed == {
        "data.datasets", "model.path", "optim.decay_steps", "training.image_input_noise", "training.max_steps",
        "training.output_dir", "training.save_steps", "training.train_modules",
    }  # fmt: skip
    cfg = load_preset("shapes_stage3_attn")
    assert cfg.model.path == "runs/shapes/stage2" and cfg.data.datasets[0].shards == "data/shapes-ft3-latents"
    with torch.device("meta"):  # stage 2's export has the built-in model's config
        model = NextStep(load_config(BUILTIN_MODEL / "config.json"))
    set_trainable(model, cfg.training.train_modules)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trained.values()) == 1_399_552  # 2.8 MB of fp16: what the git history grows by
    assert not any(n.startswith(("image_head", "lm_head")) or ".mlp." in n for n in trained)


def test_shapes_stage4_continues_stage_3_on_the_stage_3a_data():
    changed = {line.split(":")[0] for line in diff(load_preset("shapes_stage3"), load_preset("shapes_stage4"))}
    assert changed == {"data.datasets", "model.path", "optim.decay_steps", "training.max_steps", "training.output_dir"}
    stage4 = load_preset("shapes_stage4")
    assert stage4.model.path == "runs/shapes/stage3" and stage4.training.train_modules == []
    assert stage4.data.datasets == load_preset("shapes_stage3_attn").data.datasets


def _params(cfg: TrainConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in NextStep(cfg.model.arch).parameters())


def test_preset_sizes():
    assert _params(load_preset("shapes")) <= 15e6
    # The built-in model ships in the package: fp16 weights with the shipped tokenizer's vocabulary, plus
    # the shipped VAE, within 25 MB.
    shapes = load_preset("shapes")
    shapes.model.arch = resolve_arch(shapes, TextTokenizer(BUILTIN_MODEL))
    vae_bytes = (BUILTIN_MODEL / "vae" / "checkpoint.pt").stat().st_size
    assert 2 * _params(shapes) + vae_bytes <= 25e6
    assert 0.9e9 <= _params(load_preset("nextstep_1b")) - 2 * 152064 * 2048 <= 1.2e9  # non-embedding ~1B
    arch = load_preset("nextstep_qwen14b_512px").model.arch
    shape = (arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads)
    assert shape == (5120, 48, 40, 8)
    assert (arch.head_dim, arch.intermediate_size, arch.rms_norm_eps, arch.vocab_size) == (128, 13824, 1e-5, 152064)
    assert (arch.fm_head_dim, arch.fm_head_layers) == (1536, 12)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="no config preset 'nope'"):
        load_preset("nope")


def test_show_diff_and_eshow(capsys):
    assert C.main(["show", "debug", "training.max_steps=7"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["training"]["max_steps"] == 7
    assert C.main(["show", "debug", "training.bogus=1"]) == 2
    assert "unknown config key 'training.bogus'" in capsys.readouterr().err
    assert C.eshow_main(["configs/nextstep_qwen14b_256px.py", "configs/nextstep_qwen14b_512px.py"]) == 0
    out = capsys.readouterr().out
    assert "data.image_size: 256 -> 512" in out and 'model.init: "lm" -> "pretrained"' in out
    assert C.eshow_main(["configs/debug.py"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["arch"]["hidden_size"] == 64


def test_wsd_schedule_warms_up_holds_then_decays_and_can_be_lengthened():
    def factors(max_steps):
        cfg = apply_overrides(
            TrainConfig(),
            [
                f"training.max_steps={max_steps}",
                "optim.schedule=wsd",
                "optim.warmup_steps=10",
                "optim.decay_steps=20",
                "optim.min_lr_ratio=0.1",
            ],
        )
        return [lr_factor(s, cfg) for s in range(max_steps)]

    short, long = factors(100), factors(150)
    assert short[0] == pytest.approx(0.1) and short[9] == pytest.approx(1.0)
    assert short[10:81] == [1.0] * 71  # stable until the last 20 steps
    decay = short[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] == pytest.approx(0.1 + 0.9 / 20)
    # A run resumed with a larger max_steps before its decay began follows the longer run's curve exactly.
    assert long[:80] == short[:80] and long[130:] == short[80:]
