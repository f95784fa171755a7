"""Tests for the sample format: validation, caption segments, shard round trip, corrupt input."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from nextstep.data.format import (
    Sample,
    ShardWriter,
    caption_segments,
    parse_member_name,
    read_shard,
    validate_sample,
    write_shards,
)


def _image(seed: int, size=(24, 16), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0]) + ((channels,) if channels else ())
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _samples() -> list[Sample]:
    return [
        Sample("t2i0", "a red cat <image_0>", [_image(0)], {"source": "x", "score": 0.5}),
        Sample("inter1", "a <image_0> then <image_1> end", [_image(1), _image(2, (8, 32))]),
        Sample("edit2", "<image_0> make it blue <image_1>", [_image(3), _image(4)], {"task": "edit"}),
        Sample("text3", "only text, no images"),
        Sample("gray4", "<image_0>", [_image(5, mode="L")]),
    ]


def _assert_same(a: Sample, b: Sample) -> None:
    assert (a.key, a.caption, a.meta) == (b.key, b.caption, b.meta)
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images, strict=True):
        assert x.mode == y.mode and np.array_equal(np.asarray(x), np.asarray(y))


def test_caption_segments():
    assert caption_segments("a <image_0> b") == ["a ", 0, " b"]
    assert caption_segments("<image_0>x<image_1>") == [0, "x", 1]
    assert caption_segments("plain") == ["plain"]
    assert caption_segments("") == []


@pytest.mark.parametrize("key", ["a.b", "a-b", "", "a b", "a/b"])
def test_bad_keys_rejected(key):
    with pytest.raises(ValueError, match="key must"):
        validate_sample(Sample(key, "text"))


@pytest.mark.parametrize(
    "caption,n",
    [
        ("<image_0>", 0),
        ("x", 1),
        ("<image_1> <image_0>", 2),
        ("<image_0> <image_0>", 1),
        ("<image_0> <image_2>", 2),
    ],
)
def test_placeholder_mismatch_names_key(caption, n):
    with pytest.raises(ValueError, match="sample 'bad7'"):
        validate_sample(Sample("bad7", caption, [_image(i) for i in range(n)]))


def test_meta_with_caption_rejected():
    with pytest.raises(ValueError, match="sample 'k'"):
        validate_sample(Sample("k", "x", meta={"caption": "y"}))


def test_parse_member_name():
    assert parse_member_name("abc.json") == ("abc", None)
    assert parse_member_name("dir/abc-12.png") == ("abc", 12)
    with pytest.raises(ValueError):
        parse_member_name("abc.txt")
    with pytest.raises(ValueError):
        parse_member_name("a-b-0.png")


def test_round_trip_and_sharding(tmp_path):
    samples = _samples()
    paths = write_shards(samples, tmp_path, prefix="idx", max_count=2, start_index=3)
    assert [p.name for p in paths] == ["idx-000003.tar", "idx-000004.tar", "idx-000005.tar"]
    assert not list(tmp_path.glob(".*tmp*"))
    got = [s for p in paths for s in read_shard(p)]
    for a, b in zip(samples, got, strict=True):
        _assert_same(a, b)
    # Same samples give byte-identical shards (stable checksums).
    again = write_shards(samples, tmp_path / "again", prefix="idx", max_count=2, start_index=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_writer_discards_partial_shard_on_error(tmp_path):
    with pytest.raises(ValueError, match="sample 'x-y'"):
        with ShardWriter(tmp_path, max_count=2) as w:
            for s in _samples()[:3]:
                w.write(s)
            w.write(Sample("x-y", "bad"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data-000000.tar"]


def test_duplicate_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate key"):
        write_shards([Sample("a", "x"), Sample("a", "y")], tmp_path)


def test_truncated_shard_raises(tmp_path):
    (path,) = write_shards(_samples(), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((tarfile.ReadError, EOFError, ValueError, OSError)):
        list(read_shard(path))


def test_corrupt_image_raises(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k.json", b'{"caption": "<image_0>"}'), ("k-0.png", b"not a png")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="image 0 of sample 'k'"):
        list(read_shard(path))


def test_a_bad_member_spoils_its_sample_only(tmp_path):
    """A stray member name, a duplicate or a missing JSON marks that sample (RawSample.error); the samples
    after it are read, where these errors used to end the whole shard."""
    from nextstep.data.format import decode_sample, iter_raw_samples

    members = [("a.json", b'{"caption": "x"}'), ("b.json", b'{"caption": "y"}'), ("b.txt", b"stray")]
    members += [("c.json", b'{"caption": "z"}'), ("c.json", b'{"caption": "z"}'), ("d-0.png", b"no json")]
    members += [("e.json", b'{"caption": "w"}')]
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        raws = list(iter_raw_samples(f))
    assert [(r.key, r.error) for r in raws] == [
        ("a", None),
        ("b", "sample 'b': tar member 'b.txt' is not 'key.json' or 'key-<i>.<png|jpg|jpeg|webp|npy>'"),
        ("c", "sample 'c': duplicate c.json"),
        ("d", "sample 'd': missing d.json"),
        ("e", None),
    ]
    with pytest.raises(ValueError, match="sample 'b': tar member 'b.txt'"):
        decode_sample(raws[1])
    assert decode_sample(raws[4]).caption == "w"
