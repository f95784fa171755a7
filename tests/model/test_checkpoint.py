"""Checkpoint directory I/O: lossless round trips (single and sharded) and clear one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextstep.model.checkpoint import from_pretrained, save_pretrained
from nextstep.model.config import NextStepConfig, config_from_dict
from nextstep.model.tokenizer import TextTokenizer
from nextstep.model.vae import load_vae
from tests.refs import reference_dirs


@pytest.mark.parametrize("ref", reference_dirs(), ids=lambda p: p.name)
@pytest.mark.parametrize("shard_bytes", [5 * 1024**3, 200_000], ids=["single", "sharded"])
def test_round_trip_is_bit_exact(tmp_path, ref, shard_bytes):
    model = from_pretrained(ref)
    vae_dir = tmp_path / "vae_with_state"
    shutil.copytree(ref / "vae", vae_dir)
    (vae_dir / "train_state.pt").write_bytes(b"optimizer state, not part of a checkpoint")
    out = save_pretrained(model, tmp_path / "ckpt", tokenizer_dir=ref, vae_dir=vae_dir, max_shard_bytes=shard_bytes)
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["checkpoint.pt", "config.json"]
    assert (out / "model.safetensors.index.json").is_file() == (shard_bytes < 1e6)
    again = from_pretrained(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()
    assert (out / "vae" / "checkpoint.pt").read_bytes() == (ref / "vae" / "checkpoint.pt").read_bytes()
    if shard_bytes >= 1e6:  # the official file itself round-trips tensor for tensor
        orig = load_file(str(ref / "model.safetensors"))
        saved = load_file(str(out / "model.safetensors"))
        assert orig.keys() == saved.keys() and all(torch.equal(orig[k], saved[k]) for k in orig)


def _copy(ref, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(ref, dst, ignore=shutil.ignore_patterns("reference"))
    return dst


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        from_pretrained(tmp_path / "nope")
    ref = reference_dirs()[0]
    d = _copy(ref, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(d)


def test_shape_mismatch_names_the_parameter(tmp_path):
    d = _copy(reference_dirs()[0], tmp_path)
    state = load_file(str(d / "model.safetensors"))
    state["layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch for parameter 'layers.1.mlp.up_proj.weight'"):
        from_pretrained(d)
    del state["layers.1.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="missing parameter 'layers.1.mlp.up_proj.weight'"):
        from_pretrained(d)


def test_config_key_errors(tmp_path):
    raw = json.loads((reference_dirs()[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="unknown config key 'hiden_size'"):
        config_from_dict({**raw, "hiden_size": 3})
    del raw["hidden_size"]
    with pytest.raises(ValueError, match="missing required key.*hidden_size"):
        config_from_dict(raw)
    with pytest.raises(ValueError, match="multiple of"):
        NextStepConfig(num_attention_heads=3, num_key_value_heads=2)


@pytest.mark.parametrize("ref", reference_dirs(), ids=lambda p: p.name)
def test_hf_release_key_aliases(ref):
    """The public NextStep-1.1 config names the head and latent fields differently."""
    raw = json.loads((ref / "config.json").read_text())
    # Values no default has, so a dropped alias cannot pass by falling back to the default.
    theirs = {"genloss_width": 96, "genloss_depth": 3, "num_channels": 8, "patch_size": 1}
    for ours in ("fm_head_dim", "fm_head_layers", "latent_channels", "latent_patch_size"):
        raw.pop(ours)
    cfg = config_from_dict({**raw, **theirs, "genloss_type": "transport", "image_size": 64})
    assert (cfg.fm_head_dim, cfg.fm_head_layers, cfg.latent_channels, cfg.latent_patch_size) == (96, 3, 8, 1)


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_shards_must_stay_inside_the_checkpoint(tmp_path, shard):
    d = _copy(reference_dirs()[0], tmp_path)
    index = {"weight_map": {"embed_tokens.weight": "model.safetensors", "norm.weight": shard}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shards must be files inside"):
        from_pretrained(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    with pytest.raises(ValueError, match="is not a safetensors index"):
        from_pretrained(d)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.9])
def test_truncated_files_are_one_value_error(tmp_path, keep):
    d = _copy(reference_dirs()[0], tmp_path)
    for path in (d / "model.safetensors", d / "tokenizer.json"):
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        from_pretrained(d)
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        TextTokenizer(d)
    vae = d / "vae" / "checkpoint.pt"
    vae.write_bytes(vae.read_bytes()[: int(vae.stat().st_size * keep)])
    with pytest.raises(ValueError, match="truncated or not a torch file"):
        load_vae(d / "vae")
