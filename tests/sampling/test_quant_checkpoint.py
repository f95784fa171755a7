"""`nextstep quantize` and quantised checkpoints: the same images as quantising at load, the stored format,
sharding, resuming an interrupted run, one-line errors, and a load that never holds full-precision weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import nextstep
from nextstep.cli import main
from nextstep.model.checkpoint import build_model, from_pretrained, save_pretrained, weight_files
from nextstep.model.config import NextStepConfig
from nextstep.sampling import quant_checkpoint
from nextstep.sampling.quant_checkpoint import load_model, quantize_checkpoint
from nextstep.sampling.quantize import QuantizedLinear, quantize_weight
from tests.refs import ROOT

QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
CASES = [("nextstep11-tiny", "fp8", 5 * 2**30), ("nextstep-tiny", "int8", 100_000)]  # the second in shards


def state_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The keys in which two state_dicts differ, by kind (empty when they are equal), for a readable failure."""
    shared = sorted(a.keys() & b.keys())
    found = {
        "only_in_first": sorted(a.keys() - b.keys()),
        "only_in_second": sorted(b.keys() - a.keys()),
        "dtype": [k for k in shared if a[k].dtype != b[k].dtype],
        "value": [k for k in shared if not torch.equal(a[k].float(), b[k].float())],
    }
    return {kind: keys for kind, keys in found.items() if keys}


@pytest.mark.parametrize("ref, mode, shard", CASES)
def test_quantized_checkpoint_equals_quantizing_at_load(tmp_path, ref, mode, shard):
    """Same modules, bit-equal weights, scales and biases, and bit-equal images from the same seed as the
    full-precision checkpoint loaded with quantize=mode (its weights are float32, exact in the load dtype)."""
    out = quantize_checkpoint(ROOT / ref, tmp_path / "q", mode=mode, max_shard_bytes=shard)
    assert (len(weight_files(out)) > 1) == (shard < 2**20) and (out / "vae" / "checkpoint.pt").is_file()
    stored = nextstep.load(out, device="cpu")
    at_load = nextstep.load(ROOT / ref, device="cpu", quantize=mode)
    assert not (diff := state_differences(stored.model.state_dict(), at_load.model.state_dict())), diff
    names = [n for n, m in at_load.model.named_modules() if isinstance(m, QuantizedLinear)]
    assert names == [n for n, m in stored.model.named_modules() if isinstance(m, QuantizedLinear)] and names
    opts = dict(size=(32, 32), steps=3, seed=5)
    x, y = stored.generate("a cat", **opts)[0], at_load.generate("a cat", **opts)[0]
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_stored_format(tmp_path):
    """Each quantised linear: `.weight` (N, K) fp8 and `.weight_scale` (N,) float32, as quantize_weight makes
    them from the source weight; other tensors as stored; config.json names the mode and the modules."""
    src = ROOT / "nextstep11-tiny"
    out = quantize_checkpoint(src, tmp_path / "q", mode="fp8")
    info = json.loads((out / "config.json").read_text())["quantization"]
    assert info["mode"] == "fp8" and {"layers.0.mlp.down_proj", "image_in_projector"} <= set(info["modules"])
    assert not any(m.startswith(("embed_tokens", "lm_head")) for m in info["modules"])
    with safe_open(str(src / "model.safetensors"), "pt") as f, safe_open(str(out / "model.safetensors"), "pt") as g:
        for module in info["modules"]:
            q, scale = quantize_weight(f.get_tensor(f"{module}.weight"), "fp8")
            stored = g.get_tensor(f"{module}.weight")
            assert stored.dtype == torch.float8_e4m3fn and torch.equal(stored.float(), q.float())
            assert torch.equal(g.get_tensor(f"{module}.weight_scale"), scale) and scale.dtype == torch.float32
        assert torch.equal(f.get_tensor("embed_tokens.weight"), g.get_tensor("embed_tokens.weight"))
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_cli_generate_from_quantized_dir_equals_quantize_flag(tmp_path, capsys):
    src = ROOT / "nextstep11-tiny"
    assert main(["quantize", str(src), str(tmp_path / "q"), "--mode", "int8"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "q")
    common = ["generate", "a dog", "--size", "32x32", "--steps", "2", "--device", "cpu"]
    assert main([*common, "--model", str(tmp_path / "q"), "-o", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--model", str(src), "--quantize", "int8", "-o", str(tmp_path / "b.png")]) == 0
    pixels = [np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png")]
    assert np.array_equal(*pixels)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "/nonexistent/in", "{tmp}/out"], "model directory not found: /nonexistent/in"),
        (["quantize", "{ref}", "{tmp}"], "already exists"),
        (["quantize", "{ref}", "{tmp}/out", "--mode", "int4"], "argument --mode: invalid choice: 'int4'"),
        (["quantize", "{ref}", "{tmp}/out", "--max-shard-mb", "0"], "--max-shard-mb must be > 0, got 0"),
        (["quantize", "{q}", "{tmp}/out2"], "is already quantised (fp8)"),
        (["generate", "x", "--model", "{q}", "--quantize", "int8"], "holds fp8 weights: quantize must be none or fp8"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    ref = ROOT / "nextstep11-tiny"
    q = quantize_checkpoint(ref, tmp_path / "q", mode="fp8") if "{q}" in argv else None
    argv = [a.format(tmp=tmp_path, ref=ref, q=q) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # a bad command line of a forwarded command (nextstep.args.ArgumentParser)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("nextstep: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_full_precision_loader_refuses_a_quantized_dir(tmp_path):
    q = quantize_checkpoint(ROOT / "nextstep-tiny", tmp_path / "q", mode="int8")
    with pytest.raises(ValueError, match="holds int8 weights"):
        from_pretrained(q)
    with pytest.raises(ValueError, match="mode must be one of fp8, int8, got 'int4'"):
        quantize_checkpoint(ROOT / "nextstep-tiny", tmp_path / "r", mode="int4")


def test_interrupted_run_leaves_no_output_and_resumes(tmp_path, monkeypatch):
    """A failure while writing shard 2 leaves OUT absent and OUT.partial with shard 1; the rerun writes only
    the missing shards and gives the same files as an uninterrupted run."""
    src, shard = ROOT / "nextstep-tiny", 100_000
    whole = quantize_checkpoint(src, tmp_path / "whole", mode="fp8", max_shard_bytes=shard)
    written = []
    save = quant_checkpoint.save_file

    def failing_save(tensors, path, metadata):
        if written:
            raise OSError("disk full")
        written.append(path)
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(quant_checkpoint, "save_file", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        quantize_checkpoint(src, out, mode="fp8", max_shard_bytes=shard)
    n = len(weight_files(whole))
    assert not out.exists() and (tmp_path / "out.partial" / f"model-00001-of-{n:05d}.safetensors").is_file()
    written.clear()
    monkeypatch.setattr(quant_checkpoint, "save_file", lambda t, p, metadata: written.append(p) or save(t, p, metadata))
    with pytest.raises(ValueError, match="other settings"):
        quantize_checkpoint(src, out, mode="int8", max_shard_bytes=shard)
    quantize_checkpoint(src, out, mode="fp8", max_shard_bytes=shard)
    assert len(written) == n - 1 and not (tmp_path / "out.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for file in weight_files(whole):
        assert (out / file.name).read_bytes() == file.read_bytes()


LOAD_PEAK = textwrap.dedent(
    """
    import resource, sys, torch
    from nextstep.sampling.quant_checkpoint import load_model

    def rss_kb(field):
        return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

    before = rss_kb("VmRSS:")
    model = load_model(sys.argv[1], dtype=torch.float32, device="cpu")
    print(rss_kb("VmHWM:") - before)
    """
)


def test_load_never_holds_full_precision_weights(tmp_path):
    """A 50M-parameter random model (200 MB in float32): loading its fp8 checkpoint raises the peak RSS of a
    fresh process by less than half the float32 size of the quantised weights (one copy in memory, plus at
    most one in mapped pages), and every quantised weight is 1 byte per entry."""
    cfg = NextStepConfig(
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=2816,
        vocab_size=512,
        fm_head_dim=1024,
        fm_head_layers=2,
    )
    save_pretrained(build_model(cfg), tmp_path / "src")
    q = quantize_checkpoint(tmp_path / "src", tmp_path / "q", mode="fp8")
    model = load_model(q, dtype=torch.float32, device="cpu")
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert all(m.weight.dtype == QDTYPE["fp8"] for m in quantized)
    matrices = [t for t in [*model.layers.parameters(), *model.layers.buffers()] if t.dim() == 2]
    assert matrices and all(t.dtype == QDTYPE["fp8"] for t in matrices)
    float_bytes = 4 * sum(m.weight.numel() for m in quantized)
    assert float_bytes > 150e6
    r = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(q)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1]) * 1024
    assert peak < float_bytes / 2, (peak, float_bytes)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_bf16_checkpoint_on_cuda_equals_quantizing_at_load(tmp_path, mode):
    """A bf16 checkpoint (as the official releases are), loaded on CUDA in bf16: the quantised checkpoint holds
    the same weights as --quantize and gives the same image, through the fused decode kernels."""
    ref = ROOT / "nextstep11-tiny"
    save_pretrained(
        from_pretrained(ref, dtype=torch.bfloat16), tmp_path / "bf16", tokenizer_dir=ref, vae_dir=ref / "vae"
    )
    q = quantize_checkpoint(tmp_path / "bf16", tmp_path / "q", mode=mode)
    stored = nextstep.load(q, device="cuda", dtype=torch.bfloat16)
    at_load = nextstep.load(tmp_path / "bf16", device="cuda", dtype=torch.bfloat16, quantize=mode)
    assert not (diff := state_differences(stored.model.state_dict(), at_load.model.state_dict())), diff
    opts = dict(size=(32, 32), steps=3, seed=2)
    x, y = stored.generate("a cat", **opts)[0], at_load.generate("a cat", **opts)[0]
    assert np.array_equal(np.asarray(x), np.asarray(y))
