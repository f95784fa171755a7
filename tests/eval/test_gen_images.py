"""`nextstep eval gen-images`: GenEval / DPG-Bench / plain layouts, resumable."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from nextstep.eval.gen_images import generate_all, read_prompts
from nextstep.sampling.pipeline import Pipeline
from tests.refs import reference_dirs

OPTS = dict(size=(32, 32), steps=2, seed=0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(reference_dirs()[-1], device="cpu")


def test_geneval_layout_and_resume(tmp_path, pipe):
    prompts_file = tmp_path / "evaluation_metadata.jsonl"
    lines = [
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"},
    ]
    prompts_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    prompts = read_prompts(prompts_file, "geneval")
    assert generate_all(pipe, prompts, out, "geneval", n=2, batch_size=1, **OPTS) == 2
    for i, line in enumerate(lines):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == line
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert Image.open(folder / "samples" / "0000.png").size == (32, 32)
    # resume: nothing left; a removed prompt folder is made again
    assert generate_all(pipe, prompts, out, "geneval", n=2, batch_size=1, **OPTS) == 0
    (out / "00001" / "metadata.jsonl").unlink()
    assert generate_all(pipe, prompts, out, "geneval", n=2, batch_size=1, **OPTS) == 1


def test_dpg_grid_from_folder_and_plain(tmp_path, pipe):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "abc.txt").write_text("a cat on a mat\n")
    (folder / "xyz.txt").write_text("a blue bird\n")
    out = tmp_path / "dpg"
    generate_all(pipe, read_prompts(folder, "dpg"), out, "dpg", n=4, batch_size=2, **OPTS)
    assert Image.open(out / "abc.png").size == (64, 64)  # 2x2 grid of 32 px samples
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    plain = tmp_path / "plain"
    generate_all(pipe, read_prompts(txt, "plain"), plain, "plain", n=1, batch_size=4, **OPTS)
    assert (plain / "00000_0.png").is_file() and (plain / "00001_0.png").is_file()
    assert [json.loads(x)["prompt"] for x in (plain / "prompts.jsonl").read_text().splitlines()] == ["one", "two"]


def test_bad_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "nope.jsonl", "geneval")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "x"}\n')
    with pytest.raises(ValueError, match="line 1 has no 'prompt'"):
        read_prompts(bad, "geneval")
