"""Tests for the training data pipeline: determinism, exact resume, mixture, workers, skipping bad data."""

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.data.buckets import make_buckets, nearest_bucket, normalize_pixels, resize_center_crop, to_tensor
from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.data.format import Sample, write_shards
from nextstep.data.wds import build_dataloader, drop_caption_text

SIZES = [(32, 32), (48, 24), (24, 48)]  # (W, H): square, landscape, portrait


def _make(root, name: str, n: int, per_shard: int = 5) -> list[str]:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    samples = []
    for i in range(n):
        w, h = SIZES[i % 3]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if i % 7 == 6:
            samples.append(Sample(f"{name}{i}", f"text only {name} {i}", meta={"i": i}))
        elif i % 5 == 4:
            samples.append(Sample(f"{name}{i}", f"<image_0> edit {i} <image_1>", [image, image], {"i": i}))
        else:
            samples.append(Sample(f"{name}{i}", f"{name} caption {i} <image_0>", [image], {"i": i}))
    return [str(p) for p in write_shards(samples, root / name, prefix=name, max_count=per_shard)]


def _cfg(datasets, **kw) -> DataConfig:
    base = dict(image_size=32, batch_size=4, num_workers=0, shuffle_buffer=8, caption_drop_prob=0.3, seed=1)
    return DataConfig(datasets=datasets, **{**base, **kw})


def _keys(batch) -> list[str]:
    return [s.key for s in batch.samples]


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _summary(batches):
    return [(_keys(b), [s.caption for s in b.samples], b.bucket) for b in batches]


@pytest.fixture
def shards(tmp_path):
    return _make(tmp_path, "alpha", 40), _make(tmp_path, "beta", 40)


def test_buckets_and_crop():
    buckets = make_buckets(256, (0.5, 1.0, 2.0))
    assert buckets == [(368, 176), (256, 256), (176, 368)]
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert nearest_bucket(400, 200, buckets) == (176, 368)
    out = resize_center_crop(Image.new("RGBA", (100, 40), (0, 0, 0, 0)), (16, 32))
    assert out.size == (32, 16) and out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert drop_caption_text("a <image_0> b <image_1> c") == "<image_0><image_1>"


def test_uint8_pixels_normalize_as_inference_does():
    """The loader hands out uint8 pixels; normalized on the device they equal the pipeline's pil_to_pixels."""
    from nextstep.model.vae import pil_to_pixels

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1] = 0, 255
    x = to_tensor(Image.fromarray(rgb))
    assert x.dtype == torch.uint8 and x.shape == (3, 5, 7)
    y = normalize_pixels(x)
    assert y[:, 0, 0].tolist() == [-1.0] * 3 and y[:, 0, 1].tolist() == [1.0] * 3
    torch.testing.assert_close(y, pil_to_pixels(Image.fromarray(rgb))[0], rtol=0, atol=1e-6)
    assert normalize_pixels(x, torch.bfloat16).dtype == torch.bfloat16


def test_one_pass_yields_each_sample_once_and_well_formed(shards):
    a, _ = shards
    loader = build_dataloader(_cfg([DatasetSpec(shards=a)], loop=False))
    batches = list(loader)
    keys = [k for b in batches for k in _keys(b)]
    assert sorted(keys) == sorted(f"alpha{i}" for i in range(40))
    for b in batches:
        for s in b.samples:
            assert len(s.images) == len(s.caption.split("<image_")) - 1
        if b.bucket is not None:
            assert b.images.shape[1:] == (3, *b.bucket) and b.images.dtype == torch.uint8
            assert b.images.shape[0] == sum(len(s.images) for s in b.samples)
    dropped = [s for b in batches for s in b.samples if s.images and "caption" not in s.caption]
    assert 0 < len(dropped) < 30  # caption_drop_prob=0.3 on ~34 image samples


def test_deterministic_and_epoch_dependent(shards):
    a, b = shards
    cfg = _cfg([DatasetSpec(shards=a), DatasetSpec(shards=b)])
    first = _summary(_take(build_dataloader(cfg), 12))
    assert first == _summary(_take(build_dataloader(cfg), 12))
    assert first != _summary(_take(build_dataloader(cfg, seed=2), 12))
    one = build_dataloader(_cfg([DatasetSpec(shards=a)], loop=False))
    e0 = _summary(list(one))
    e1 = _summary(list(one))  # next pass reads epoch 1: new order, same samples
    assert e0 != e1 and sorted(sum((k for k, _, _ in e0), [])) == sorted(sum((k for k, _, _ in e1), []))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 7])
def test_exact_resume_mid_epoch(shards, num_workers, cut):
    a, b = shards
    cfg = _cfg([DatasetSpec(shards=a, weight=2), DatasetSpec(shards=b)], num_workers=num_workers)
    full = _summary(_take(build_dataloader(cfg), 30))
    loader = build_dataloader(cfg)
    head = _take(loader, cut)
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    resumed = build_dataloader(cfg)
    resumed.load_state_dict(state)
    tail = _take(resumed, 30 - cut)
    assert _summary(head) + _summary(tail) == full
    for x, y in zip(tail, _take(build_dataloader(cfg), 30)[cut:], strict=True):
        assert x.bucket == y.bucket and (x.images is None or torch.equal(x.images, y.images))


def test_resume_one_pass_and_state_mismatch(shards):
    a, _ = shards
    cfg = _cfg([DatasetSpec(shards=a)], loop=False, num_workers=2)
    full = _summary(list(build_dataloader(cfg)))
    loader = build_dataloader(cfg)
    head = _take(loader, 4)
    resumed = build_dataloader(cfg)
    resumed.load_state_dict(loader.state_dict())
    assert _summary(head) + _summary(list(resumed)) == full
    other = build_dataloader(cfg, rank=1, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(loader.state_dict())


def test_mixture_weights(tmp_path):
    a, b = _make(tmp_path, "alpha", 20), _make(tmp_path, "beta", 20)
    cfg = _cfg([DatasetSpec(shards=a, weight=3), DatasetSpec(shards=b, weight=1)], batch_size=8)
    loader = build_dataloader(cfg)
    keys = [k for batch in _take(loader, 100) for k in _keys(batch)]
    frac = sum(k.startswith("alpha") for k in keys) / len(keys)
    assert 0.70 < frac < 0.80
    assert loader.stats()["per_dataset"][0] > 2.5 * loader.stats()["per_dataset"][1]


def test_multi_worker_and_multi_rank_cover_each_sample_once(shards):
    a, _ = shards  # 8 shards over 2 ranks x 2 workers
    keys = []
    for rank in range(2):
        loader = build_dataloader(_cfg([DatasetSpec(shards=a)], loop=False, num_workers=2), rank=rank, world_size=2)
        keys += [k for b in loader for k in _keys(b)]
    assert sorted(keys) == sorted(f"alpha{i}" for i in range(40))


def test_fewer_shards_than_workers_splits_by_sample(tmp_path):
    a = _make(tmp_path, "alpha", 12, per_shard=12)
    loader = build_dataloader(_cfg([DatasetSpec(shards=a)], loop=False, num_workers=2))
    assert sorted(k for b in loader for k in _keys(b)) == sorted(f"alpha{i}" for i in range(12))


def test_corrupt_missing_and_bad_samples_are_skipped(tmp_path, caplog):
    a = _make(tmp_path, "alpha", 20)
    data = open(a[1], "rb").read()
    open(a[1], "wb").write(data[: len(data) // 2])  # truncated shard
    bad = Sample("bad0", "<image_0>", [Image.new("RGB", (8, 8))])
    (bad_shard,) = write_shards([bad, Sample("good0", "fine")], tmp_path / "bad", prefix="bad")
    raw = bytearray(open(bad_shard, "rb").read())
    start = raw.find(b"\x89PNG")
    raw[start : start + 40] = b"x" * 40  # undecodable image, shard otherwise fine
    open(bad_shard, "wb").write(bytes(raw))
    shards = a + [str(tmp_path / "missing.tar"), str(bad_shard)]
    loader = build_dataloader(_cfg([DatasetSpec(shards=shards)], loop=False))
    with caplog.at_level(logging.WARNING):
        keys = [k for b in loader for k in _keys(b)]
    stats = loader.stats()
    assert "good0" in keys and "bad0" not in keys
    assert set(keys) <= {f"alpha{i}" for i in range(20)} | {"good0"}
    assert len(keys) >= 16  # only the damaged half of one 5-sample shard is lost
    assert stats["shard_errors"] == 2 and stats["sample_errors"] >= 1
    assert "missing.tar" in caplog.text


def test_brace_patterns_and_directories(tmp_path):
    _make(tmp_path, "alpha", 10)
    pattern = str(tmp_path / "alpha" / "alpha-{000000..000001}.tar")
    for shards in (pattern, str(tmp_path / "alpha"), f"pipe:cat {tmp_path}/alpha/alpha-000000.tar"):
        loader = build_dataloader(_cfg([DatasetSpec(shards=shards)], loop=False))
        assert len([k for b in loader for k in _keys(b)]) == (5 if shards.startswith("pipe:") else 10)


def test_tokenizer_hook_and_config_validation(shards):
    a, _ = shards
    loader = build_dataloader(_cfg([DatasetSpec(shards=a)]), tokenizer_fn=lambda s: len(s.caption))
    assert all(isinstance(x, int) for x in next(iter(loader)))
    with pytest.raises(ValueError, match="weight"):
        DatasetSpec(shards=a, weight=0)
    with pytest.raises(ValueError, match="multiple"):
        DataConfig(datasets=[], image_size=250)
    cfg = DataConfig(datasets=[{"shards": a, "weight": 2.0}])
    assert cfg.datasets[0].name == "dataset0" and cfg.datasets[0].weight == 2.0


@pytest.mark.parametrize("per_shard", [5, 40])  # shard split, and sample split (1 shard, 2 workers)
@pytest.mark.parametrize("cut", [2, 9, 17])  # 17: inside the final buffer drain of a 40-sample pass
def test_fast_resume_with_warmup_index(tmp_path, caplog, per_shard, cut):
    from nextstep.data.tools import gen_meta, warmup_index

    a = _make(tmp_path, "alpha", 40, per_shard=per_shard)
    gen_meta(tmp_path / "alpha")
    warmup_index(tmp_path / "alpha")
    cfg = _cfg([DatasetSpec(shards=a)], loop=False, batch_size=2, shuffle_buffer=6, num_workers=2)
    full = _summary(list(build_dataloader(cfg)))
    loader = build_dataloader(cfg)
    head = _take(loader, cut)
    resumed = build_dataloader(cfg)
    resumed.load_state_dict(loader.state_dict())
    cfg0 = _cfg([DatasetSpec(shards=a)], loop=False, batch_size=2, shuffle_buffer=6, num_workers=0)
    with caplog.at_level(logging.DEBUG, logger="nextstep.data.stream"):
        tail = list(resumed)
        # Same fast path in-process, where the log is visible.
        solo = build_dataloader(cfg0)
        solo_head = _take(solo, cut)
        solo_resumed = build_dataloader(cfg0)
        solo_resumed.load_state_dict(solo.state_dict())
        solo_tail = list(solo_resumed)
    assert _summary(head) + _summary(tail) == full
    assert _summary(solo_head) + _summary(solo_tail) == _summary(list(build_dataloader(cfg0)))
    assert "fast seek" in caplog.text


def test_a_cut_shard_is_reported_at_every_cut_point(tmp_path, caplog):
    """Cut before the end-of-archive marker, a shard loses samples: the loader and gen_meta's scan report it
    (tarfile alone ends such a stream silently at a member boundary or in a header)."""
    import tarfile

    from nextstep.data.tools import scan_shard

    (path,) = [Path(p) for p in _make(tmp_path, "alpha", 6, per_shard=6)]
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    marker = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive zero blocks start
    cut_path = tmp_path / "cut.tar"
    cuts = sorted({*range(0, marker + 512, 97), *range(0, marker + 512, 512), marker, marker + 511})
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        loader = build_dataloader(_cfg([DatasetSpec(shards=str(cut_path))], loop=False))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nextstep.data.stream"):
            keys = [k for b in loader for k in _keys(b)]
        assert loader.stats()["shard_errors"] == 1 and "cut.tar" in caplog.text, (cut, keys)
        assert len(keys) < 6 and scan_shard(cut_path)["error"], cut
    cut_path.write_bytes(data[: marker + 512])  # the first zero block ends the archive: nothing is lost
    loader = build_dataloader(_cfg([DatasetSpec(shards=str(cut_path))], loop=False))
    assert len([k for b in loader for k in _keys(b)]) == 6 and loader.stats()["shard_errors"] == 0


def test_an_oversize_image_is_a_bad_sample_named_by_shard_and_key(tmp_path, caplog):
    """An image above io.MAX_PIXELS is refused from its header (a 12000x12000 1-bit PNG used 24 GB decoded)."""
    import io
    import tarfile

    from nextstep.data.format import encode_sample
    from tests.bombs import bomb_png_bytes

    good = [Sample(f"g{i}", "<image_0>", [Image.new("RGB", (32, 32), (i, 0, 0))]) for i in range(3)]
    members = encode_sample(good[0]) + [("big.json", b'{"caption": "<image_0>"}'), ("big-0.png", bomb_png_bytes(5000))]
    members += encode_sample(good[1]) + encode_sample(good[2])
    path = tmp_path / "bomb.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    loader = build_dataloader(_cfg([DatasetSpec(shards=str(path))], loop=False, caption_drop_prob=0))
    with caplog.at_level(logging.WARNING):
        keys = sorted(k for b in loader for k in _keys(b))
    assert keys == ["g0", "g1", "g2"] and loader.stats()["sample_errors"] == 1
    line = next(r.getMessage() for r in caplog.records if "big" in r.getMessage())
    assert "sample big in " + str(path) in line and "is 5000x5000 (25000000 pixels), more than the limit" in line


@pytest.mark.parametrize("num_workers", [0, 2])
def test_no_readable_samples_is_one_clear_error(tmp_path, num_workers):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    loader = build_dataloader(_cfg([DatasetSpec(shards=str(bad), name="broken")], num_workers=num_workers))
    with pytest.raises(ValueError) as e:
        next(iter(loader))
    assert str(e.value) == "dataset 'broken': no readable samples in its 1 shard(s)"
