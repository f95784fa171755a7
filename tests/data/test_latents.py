"""Latent shards: encode-latents keeps every sample and stores vae.encode of the bucketed image; it
resumes, skips corrupt shards and refuses another VAE's output directory; the loader and the training
loop read the latents, and training on them matches training on the images with the VAE in the step."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.cli import main as cli_main
from nextstep.data.buckets import resize_center_crop
from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.data.format import Sample, decode_latent, encode_latent, encode_sample, read_shard, write_shards
from nextstep.data.latents import encode_latents
from nextstep.data.tools import gen_meta
from nextstep.data.wds import build_dataloader
from nextstep.model.vae import AutoEncoder, VAEConfig, load_vae, pil_to_pixels, save_vae
from nextstep.train import loop
from nextstep.train.config import apply_overrides
from tests.train.test_loop import CAPTIONS, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # as in test_loop


@pytest.fixture
def shards(tmp_path):
    """A tiny VAE and 13 samples in 3 shards: 40x32 images (center-cropped to the 32px bucket), one sample
    with two images, one text-only sample, plus a corrupt shard."""
    torch.manual_seed(0)
    save_vae(AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=32)), tmp_path / "vae")
    rng = np.random.default_rng(0)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))

    samples = [Sample(f"s{i}", CAPTIONS[i % 4], [image()], {"i": i}) for i in range(11)]
    samples.append(Sample("two", "<image_0> then <image_1>", [image(), image()]))
    samples.append(Sample("text", "no image here"))
    write_shards(samples, tmp_path / "img", prefix="d", max_count=5)
    (tmp_path / "img" / "d-999999.tar").write_bytes(b"not a tar" * 100)
    return tmp_path, samples


def test_encode_latents_keeps_samples_and_stores_the_vae_latents(shards):
    root, samples = shards
    report = encode_latents(  # on the CPU in fp32 wherever the test runs, so the latents can be checked exactly
        root / "img", root / "lat", vae_dir=root / "vae", image_size=32, aspect_ratios=(1.0,), batch=4, workers=0,
        device="cpu", dtype="float32",
    )  # fmt: skip
    paths = report.paths
    assert len(report.skipped) == 1 and report.skipped[0].startswith(str(root / "img" / "d-999999.tar"))
    assert [p.name for p in paths] == ["latents-000000.tar", "latents-000001.tar", "latents-000002.tar"]
    assert not (root / "lat" / "latents-000003.tar").exists()  # the corrupt shard is left out
    out = [s for p in paths for s in read_shard(p)]
    assert [(s.key, s.caption, s.meta) for s in out] == [(s.key, s.caption, s.meta) for s in samples]
    vae = load_vae(root / "vae", dtype=torch.float32)
    for got, src in zip(out, samples, strict=True):
        assert len(got.images) == len(src.images)
        for lat, im in zip(got.images, src.images, strict=True):
            assert lat.dtype == torch.float16 and lat.shape == (16, 4, 4)
            with torch.no_grad():
                want = vae.encode(pil_to_pixels(resize_center_crop(im, (32, 32))))[0]
            torch.testing.assert_close(lat.float(), want, rtol=2e-3, atol=2e-3)
    info = json.loads((root / "lat" / "latents.json").read_text())
    assert info["latent_channels"] == 16 and info["buckets"] == [[32, 32]] and info["dtype"] == "float32"
    if torch.cuda.is_available():  # the default there: bf16 on CUDA, close to the fp32 latents (max 0.063 seen)
        gpu = encode_latents(root / "img", root / "gpu", vae_dir=root / "vae", image_size=32, aspect_ratios=(1.0,))
        for a, b in zip([s for p in gpu.paths for s in read_shard(p)], out, strict=True):
            for x, y in zip(a.images, b.images, strict=True):
                torch.testing.assert_close(x.float(), y.float(), rtol=0.05, atol=0.15)

    # Rerun: finished shards are not rewritten; another VAE in the same directory is refused.
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = encode_latents(
        root / "img", root / "lat", vae_dir=root / "vae", image_size=32, aspect_ratios=(1.0,), workers=0
    )
    assert again.paths == paths and [p.stat().st_mtime_ns for p in paths] == mtimes
    torch.manual_seed(1)
    save_vae(AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=32)), root / "vae2")
    with pytest.raises(ValueError, match="another VAE"):
        encode_latents(root / "img", root / "lat", vae_dir=root / "vae2", image_size=32, aspect_ratios=(1.0,))

    # meta.json reads latent shards (sizes in latent cells).
    meta = gen_meta(root / "lat")
    assert meta["num_samples"] == 13 and not meta["errors"]
    assert meta["shards"]["latents-000000.tar"]["width"]["max"] == 4


def test_cli_encodes_and_reports_bad_input(shards, tmp_path, capsys):
    root, _ = shards
    assert cli_main(["data", "encode-latents", str(root / "img"), str(root / "cli"), "--vae", str(root / "vae"),
                     "--size", "32", "--aspect-ratios", "1", "--workers", "1"]) == 1  # fmt: skip
    assert "3 latent shards" in capsys.readouterr().out  # and the corrupt shard left out: exit status 1
    assert len(list((root / "cli").glob("latents-*.tar"))) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        cli_main(["data", "encode-latents", str(empty), str(root / "x"), "--vae", str(root / "vae")])
    assert "no .tar shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["data", "encode-latents", str(root / "img"), str(root / "x"), "--vae", str(root / "vae"),
                  "--size", "30"])  # fmt: skip
    assert "--size must be a multiple of 16" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli_main(["data", "encode-latents", str(root / "img"), str(root / "x"), "--vae", str(root / "vae"),
                      "--device", "cuda"])  # fmt: skip
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["data", "encode-latents", str(root / "img"), str(root / "x"), "--vae", str(root / "vae"),
                  "--device", "gpu0"])  # fmt: skip
    assert "bad device 'gpu0'" in capsys.readouterr().err


def test_a_bad_member_leaves_out_its_sample_not_the_shard(shards, caplog):
    root, samples = shards
    os.remove(root / "img" / "d-999999.tar")
    shard = root / "img" / "d-000000.tar"
    raw = bytearray(shard.read_bytes())
    start = raw.find(b"\x89PNG", raw.find(b"s1-0.png"))
    raw[start : start + 40] = b"x" * 40  # sample s1's image cannot be decoded; the tar is intact
    shard.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="nextstep.data.latents"):
        report = encode_latents(root / "img", root / "lat", vae_dir=root / "vae", image_size=32, workers=0)
    assert [s.key for p in report.paths for s in read_shard(p)] == [s.key for s in samples if s.key != "s1"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{shard}: cannot read image 0 of sample 's1'")
    assert "BytesIO" not in caplog.text and f"{shard}: cannot read image 0 of sample 's1'" in caplog.text


def test_latent_members_round_trip_and_reject_bad_arrays():
    x = torch.randn(16, 4, 4)
    torch.testing.assert_close(decode_latent(encode_latent(x), "k", 0), x.half())
    bad = {
        "pickled object array": np.array([{"a": 1}], dtype=object),
        "wrong rank": np.zeros((4, 4), np.float16),
        "integers": np.zeros((1, 2, 2), np.int32),
        "not finite": np.full((1, 2, 2), np.nan, np.float16),
    }
    for what, array in bad.items():
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=True)
        with pytest.raises(ValueError, match="sample 'k': latent 0"):
            decode_latent(buf.getvalue(), what.replace(what, "k"), 0)
    with pytest.raises(ValueError, match="mixes latents and images"):
        encode_sample(Sample("m", "<image_0><image_1>", [x, Image.new("RGB", (8, 8))]))


def test_training_on_latent_shards_matches_training_on_images(shards):
    root, _ = shards
    encode_latents(root / "img", root / "lat", vae_dir=root / "vae", image_size=32, workers=0, dtype="float32")
    # (default buckets: DataConfig's aspect ratios, as the runs below use)
    os.remove(root / "img" / "d-999999.tar")  # both runs see the same samples
    data = dict(image_size=32, batch_size=2, num_workers=0, shuffle_buffer=4, caption_drop_prob=0.2)

    # The loader yields the stored latents as the batch's images.
    batch = next(iter(build_dataloader(DataConfig(datasets=[DatasetSpec(shards=str(root / "lat"))], **data))))
    assert batch.images.shape == (2, 16, 4, 6) and batch.images.dtype == torch.float16  # 32x48 bucket

    runs = {}
    for name, shards_dir, latents in (("img", "img", False), ("lat", "lat", True)):
        cfg = tiny_cfg(root / f"run_{name}", max_steps=4, save_steps=0)
        cfg.model.precomputed_latents = latents
        cfg.model.vae_dir = str(root / "vae")
        cfg.data = DataConfig(datasets=[DatasetSpec(shards=str(root / shards_dir))], **data)
        runs[name] = loop.train(cfg)
    for a, b in zip(runs["img"], runs["lat"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)  # fp16 latents vs the float32 VAE

    # Latent shards with precomputed_latents=false: a clear error, not a VAE shape error deep inside.
    cfg = apply_overrides(cfg, ["model.precomputed_latents=false", f"training.output_dir={root / 'run_bad'}"])
    with pytest.raises(ValueError, match=r"image 0 holds latents \(16, 4, 6\), expected 3 channels"):
        loop.train(cfg)
