"""Tests for the data tools: build shards (folder/JSONL/CSV), gen_meta, warmup index, reader round trip."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.data.format import read_shard
from nextstep.data.index import load_index
from nextstep.data.tools import build_wds, gen_meta, main_build_wds, main_gen_meta, main_warmup, warmup_index
from nextstep.data.wds import build_dataloader


def _png(path, seed, size=(20, 12)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _manifest(tmp_path, n=12):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            doc = {
                "key": f"t{i}",
                "caption": f"a photo {i} <image_0>",
                "images": [f"img/{i}.png"],
                "src": "x",
            }
        elif kind == 1:
            doc = {"caption": f"<image_0> edit {i} <image_1>", "images": [f"img/{i}.png", f"img/{i}b.png"]}
            _png(tmp_path / "img" / f"{i}b.png", 100 + i)
        else:
            doc = {"key": f"t{i}", "caption": f"text only {i}", "images": []}
        if doc["images"]:
            _png(tmp_path / "img" / f"{i}.png", i, (16 + i, 12))
        lines.append(json.dumps(doc))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [json.loads(x) for x in lines]


def test_jsonl_round_trip_build_meta_warmup_reader(tmp_path):
    manifest, docs = _manifest(tmp_path)
    out = tmp_path / "shards"
    report = build_wds(manifest, out, shard_size=5, workers=2)
    assert report.written == 12 and len(report.paths) == 3 and not report.skipped
    got = [s for p in report.paths for s in read_shard(p)]
    assert [s.caption for s in got] == [d["caption"] for d in docs]
    assert got[0].meta == {"src": "x"} and got[0].key == "t0" and got[1].key == "s000000002"
    for s, d in zip(got, docs, strict=True):
        for im, rel in zip(s.images, d["images"], strict=True):
            assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / rel)))

    meta = gen_meta(out)
    assert meta["num_samples"] == 12 and not meta["errors"] and meta["rescanned"] == 3
    entry = meta["shards"]["data-000000.tar"]
    assert entry["count"] == 5 and entry["size"] == os.path.getsize(report.paths[0]) and len(entry["sha256"]) == 64
    assert entry["width"]["min"] == 16
    index = warmup_index(out, n_jobs=2)
    assert [e["count"] for e in index["shards"].values()] == [5, 5, 2]
    assert index["shards"]["data-000000.tar"]["keys"][:2] == ["t0", "s000000002"]
    assert len(load_index(out)) == 3

    cfg = DataConfig(
        datasets=[DatasetSpec(shards=str(out))], image_size=16, loop=False, num_workers=0, caption_drop_prob=0
    )
    keys = [s.key for b in build_dataloader(cfg) for s in b.samples]
    assert sorted(keys) == sorted(s.key for s in got)


def test_gen_meta_incremental_and_truncated(tmp_path, capsys):
    manifest, _ = _manifest(tmp_path)
    out = tmp_path / "shards"
    paths = build_wds(manifest, out, shard_size=5).paths
    assert gen_meta(out)["rescanned"] == 3
    assert gen_meta(out)["rescanned"] == 0  # size+mtime unchanged: nothing re-read
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2 + 100])
    assert len(load_index(out)) == 0  # no index yet
    assert main_gen_meta([str(out), "--workers", "1"]) == 1
    stdout = capsys.readouterr().out
    assert "CORRUPT data-000001.tar" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rescanned"] == 1 and "data-000001.tar" in meta["errors"]
    assert 0 <= meta["shards"]["data-000001.tar"]["count"] < 5
    assert main_warmup([str(out), "--n_jobs", "1"]) == 1  # the truncated shard is reported, not skipped silently
    assert "left out 1" in capsys.readouterr().out
    assert list(json.loads((out / "index.json").read_text())["left_out"]) == ["data-000001.tar"]
    assert sorted(load_index(out)) == sorted(str(p) for p in (paths[0], paths[2]))
    os.utime(paths[0], ns=(0, 0))  # touched after gen_meta: index entry no longer trusted
    assert sorted(load_index(out)) == [str(paths[2])]
    cfg = DataConfig(datasets=[DatasetSpec(shards=str(out))], image_size=16, loop=False, num_workers=0)
    loader = build_dataloader(cfg)
    keys = [s.key for b in loader for s in b.samples]
    assert len(keys) >= 7 and loader.stats()["shard_errors"] == 1


def test_folder_and_csv_sources(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    _png(folder / "my-cat.1.png", 0)
    (folder / "my-cat.1.txt").write_text("a cat")
    _png(folder / "sub" / "dog.png", 1, (64, 32))
    (folder / "sub" / "dog.txt").write_text("")  # an empty caption, on purpose
    report = build_wds(folder, tmp_path / "a", max_size=32)
    got = list(read_shard(report.paths[0]))
    assert [(s.key, s.caption) for s in got] == [("my_cat_1", "a cat <image_0>"), ("sub_dog", " <image_0>")]
    assert got[1].images[0].size == (32, 16)

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "image", "score"])
        w.writerow(["sunset", "photos/sub/dog.png", "0.9"])
        w.writerow(["no image here", "", "0.1"])
    got = list(read_shard(build_wds(tmp_path / "d.csv", tmp_path / "b").paths[0]))
    assert [(s.caption, len(s.images), s.meta) for s in got] == [
        ("sunset <image_0>", 1, {"score": "0.9"}),
        ("no image here", 0, {"score": "0.1"}),
    ]


@pytest.mark.parametrize(
    "doc,match",
    [
        ({"key": "bad-key", "caption": "x", "images": []}, "sample 'bad-key'"),
        ({"key": "k1", "caption": "<image_0> <image_1>", "images": ["img/0.png"]}, "sample 'k1'.*m.jsonl:1"),
        ({"key": "k2", "caption": "<image_0>", "images": ["img/missing.png"]}, "sample 'k2'.*missing.png"),
    ],
)
def test_bad_samples_named(tmp_path, doc, match, capsys):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "0.png", 0)
    (tmp_path / "m.jsonl").write_text(json.dumps(doc) + "\n" + json.dumps({"key": "ok", "caption": "t"}) + "\n")
    with pytest.raises(ValueError, match=match):
        build_wds(tmp_path / "m.jsonl", tmp_path / "out")
    assert main_build_wds([str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--workers", "1"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("build_wds: error: sample")
    report = build_wds(tmp_path / "m.jsonl", tmp_path / "out2", skip_bad=True)
    assert report.written == 1 and len(report.skipped) == 1
    assert not list((tmp_path / "out").glob("*.tar"))  # failed run left no partial shard


def test_warmup_requires_meta(tmp_path):
    with pytest.raises(FileNotFoundError, match="gen_meta"):
        warmup_index(tmp_path)


def test_folder_image_without_caption_file_is_reported(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "a.png", 0)
    (folder / "a.txt").write_text("a cat")
    _png(folder / "b.png", 1)  # no b.txt: an error, not a silent empty caption
    with pytest.raises(ValueError, match=r"sample 'b': image .*b\.png has no caption file b\.txt"):
        build_wds(folder, tmp_path / "out")
    report = build_wds(folder, tmp_path / "out2", skip_bad=True)
    assert report.written == 1 and len(report.skipped) == 1 and "b.txt" in report.skipped[0]


def test_oversize_image_is_refused_from_its_header(tmp_path):
    from tests.bombs import bomb_png

    (tmp_path / "img").mkdir()
    bomb_png(tmp_path / "img" / "big.png", 5000)  # 25M pixels, over io.MAX_PIXELS
    _png(tmp_path / "img" / "ok.png", 0)
    docs = [{"key": "big", "caption": "<image_0>", "images": ["img/big.png"]}]
    docs.append({"key": "ok", "caption": "<image_0>", "images": ["img/ok.png"]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    with pytest.raises(ValueError, match=r"sample 'big'.*is 5000x5000 \(25000000 pixels\), more than the limit"):
        build_wds(tmp_path / "m.jsonl", tmp_path / "out")
    report = build_wds(tmp_path / "m.jsonl", tmp_path / "out2", skip_bad=True)
    assert report.written == 1 and "big.png" in report.skipped[0]


def test_gen_meta_a_bad_member_is_a_bad_sample_not_a_corrupt_shard(tmp_path, capsys):
    manifest, _ = _manifest(tmp_path)
    out = tmp_path / "shards"
    paths = build_wds(manifest, out, shard_size=5).paths
    raw = bytearray(paths[0].read_bytes())
    start = raw.find(b"\x89PNG", raw.find(b"t3-0.png"))
    raw[start : start + 40] = b"x" * 40  # t3's image is garbage; the tar is intact
    paths[0].write_bytes(bytes(raw))
    assert main_gen_meta([str(out), "--workers", "1"]) == 1
    stdout = capsys.readouterr().out
    assert "BAD SAMPLE data-000000.tar t3: cannot read image 0 of sample 't3'" in stdout and "CORRUPT" not in stdout
    assert "BytesIO" not in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert not meta["errors"] and meta["shards"]["data-000000.tar"]["count"] == 5
    assert list(meta["bad_samples"]["data-000000.tar"]) == ["t3"]
    assert main_warmup([str(out), "--n_jobs", "1"]) == 0  # an intact tar: indexed, bad sample included
    assert len(load_index(out)) == 3
    cfg = DataConfig(datasets=[DatasetSpec(shards=str(out))], image_size=16, loop=False, num_workers=0)
    loader = build_dataloader(cfg)
    keys = [s.key for b in loader for s in b.samples]
    assert len(keys) == 11 and "t3" not in keys and loader.stats()["sample_errors"] == 1
