"""The `nextstep` command as a user runs it: PNGs out, bad input -> exit 2 with one clear line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nextstep.cli import build_parser, main
from nextstep.io import save_png
from nextstep.sampling.chain import KEY, Chain
from nextstep.sampling.options import FIELDS
from nextstep.shapes.synth import make_sample
from tests.refs import reference_dirs

SMALL = ["--size", "32x32", "--steps", "2"]


def nextstep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nextstep.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ref", reference_dirs(), ids=lambda p: p.name)
def test_generate_and_edit_write_pngs(tmp_path, ref):
    out = tmp_path / "x.png"
    r = nextstep("generate", "a cat", "--model", str(ref), "-o", str(out), *SMALL, "--n", "2")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        assert Image.open(tmp_path / f"x_{i}.png").size == (32, 32)
        (turn,) = Chain.from_json(Image.open(tmp_path / f"x_{i}.png").info[KEY]).turns
        assert (turn.command, turn.prompt, turn.index, turn.options["n"]) == ("generate", "a cat", i, 2)
    src = tmp_path / "in.png"
    Image.new("RGB", (48, 32), "red").save(src)
    r = nextstep(
        "edit", "--image", str(src), "make it blue", "--model", str(ref), "-o", str(tmp_path / "e.png"), "--steps", "2"
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "e.png").size == (48, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "a cat", "--model", "/nonexistent/model"], "model directory not found"),
        (["generate", "a cat", "--model", "{ref}", "--size", "100x100"], "multiples of 16"),
        (["generate", "a cat", "--model", "{ref}", "--steps", "0"], "steps must be > 0"),
        (["generate", "", "--model", "{ref}"], "non-empty"),
        (["generate", "a cat", "--model", "{ref}", "--size", "big"], "size must look like"),
        (["edit", "--image", "{bad}", "x", "--model", "{ref}"], "cannot read input image"),
        (["edit", "--image", "/nonexistent.png", "x", "--model", "{ref}"], "cannot read input image"),
        (["edit", "--image", "{bad}", "x", "--then", "y", "--n", "2"], "--then makes one image per turn"),
        (["edit", "--image", "{bad}", "x", "--then", " ", "--model", "{ref}"], "non-empty"),
        (["replay", "{bad}"], "cannot read image to replay"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args = [a.format(ref=reference_dirs()[0], bad=bad) for a in args]
    r = nextstep(*args, "-o", str(tmp_path / "o.png"))
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.png").exists()


def test_builtin_model_is_the_default(tmp_path):
    """No --model: the shipped model makes a 128x128 picture of the scene world (not a blank image)."""
    out = tmp_path / "s.png"
    r = nextstep("generate", "two red circles above a blue star", "-o", str(out), "--steps", "6", "--seed", "0")
    assert r.returncode == 0, r.stderr
    image = Image.open(out).convert("RGB")
    assert image.size == (128, 128)
    colors = image.getcolors(maxcolors=128 * 128)
    assert len(colors) > 20  # shapes on a background, not a flat fill


def same_pixels(a, b) -> bool:
    return np.array_equal(np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB")))


def test_then_writes_each_turn_with_its_record_and_replay_remakes_it(tmp_path):
    """Two turns on the built-in model: out.turn1.png and out.png, each recording its chain (turn, seed + k,
    instruction, source); `nextstep replay` remakes out.png from in.png to the same pixels, and refuses a source
    with other pixels."""
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    make_sample(5, seed=0).images[0].save(src)
    then = ["--then", "add a blue circle", "--seed", "4", "--steps", "2"]
    r = nextstep("edit", "--image", str(src), "make the star yellow", *then, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "out.turn1.png"), str(out)]
    chains = [Chain.from_json(Image.open(path).info[KEY]) for path in r.stdout.split()]
    assert [(t.turn, t.seed, t.prompt, t.model) for t in chains[1].turns] == [
        (1, 4, "make the star yellow", "shapes"),
        (2, 5, "add a blue circle", "shapes"),
    ]
    assert chains[0].turns == chains[1].turns[:1] and chains[1].source == str(src)
    r = nextstep("replay", str(out), "-o", str(tmp_path / "again.png"))
    assert r.returncode == 0, r.stderr
    assert "2 turn(s) replayed to the recorded pixels" in r.stderr
    assert same_pixels(tmp_path / "again.png", out)
    r = nextstep("replay", str(out), "--image", str(tmp_path / "out.turn1.png"))
    assert r.returncode == 2 and "other pixels" in r.stderr and "Traceback" not in r.stderr


def test_replay_names_both_platforms_when_pixels_differ(tmp_path):
    """A record made elsewhere (another device or dtype) that replays to other pixels says where each ran."""
    out = tmp_path / "out.png"
    r = nextstep("generate", "a red circle", "--steps", "2", "--seed", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    image = Image.open(out)
    raw = Chain.from_json(image.info[KEY])
    assert raw.turns[0].platform.startswith("cpu ")
    elsewhere = "cuda NVIDIA H200, bfloat16, torch 2.11.0"
    raw.turns[0].platform, raw.turns[0].sha256 = elsewhere, "0" * 64  # as if made there, with other pixels
    save_png(image, out, metadata={KEY: raw.to_json()})
    r = nextstep("replay", str(out), "-o", str(tmp_path / "again.png"))
    assert r.returncode == 1 and "gave other pixels" in r.stderr
    assert f"made on {elsewhere} and replayed on cpu " in r.stderr


def test_flags_come_from_the_option_schema():
    """Every GenerateOptions field marked for the CLI is a flag of its task, with the schema's choices and help."""
    sub = build_parser()._subparsers._group_actions[0].choices
    for task in ("generate", "edit"):
        actions = {a.dest: a for a in sub[task]._actions}
        for name, f in FIELDS.items():
            wanted = f.metadata["cli"] and f.metadata["task"] in (None, task)
            assert (name in actions) == wanted, (task, name)
            if wanted:
                assert actions[name].choices == f.metadata["choices"]
                assert actions[name].help.startswith(f.metadata["help"])


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["generate", "a cat", "--cfg", "inf"], "cfg must be > 0 and <= 100, got inf"),
        (["generate", "a cat", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["serve", "--max-batch", "0", "--model", "{ref}"], "max_batch must be > 0, got 0"),
    ],
)
def test_main_reports_every_error_as_one_line(capsys, argv, message):
    argv = [a.format(ref=reference_dirs()[0]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nextstep: error: ") and err.count("\n") == 1 and message in err, err


def test_preview_every_writes_the_partial_pngs_and_leaves_the_image_unchanged(tmp_path):
    """--preview-every 1 on a 4-row grid (the built-in model's 16 px tokens at 64x64): partial images after rows
    1, 2, 3 of each output, written next to it; the output itself equals a run without previews."""
    base = ["generate", "a red circle", "--size", "64x64", "--steps", "2", "--seed", "4", "--n", "2"]
    r = nextstep(*base, "-o", str(tmp_path / "x.png"), "--preview-every", "1")
    assert r.returncode == 0, r.stderr
    partials = sorted(p.name for p in tmp_path.glob("*.partial-*.png"))
    assert partials == [f"x_{i}.partial-0{k}.png" for i in range(2) for k in (1, 2, 3)]
    assert all(Image.open(tmp_path / name).size == (64, 64) for name in partials)
    r = nextstep(*base, "-o", str(tmp_path / "plain.png"))
    assert r.returncode == 0, r.stderr
    for i in range(2):
        final = Image.open(tmp_path / f"x_{i}.png").tobytes()
        assert final == Image.open(tmp_path / f"plain_{i}.png").tobytes()
        assert Image.open(tmp_path / f"x_{i}.partial-01.png").tobytes() != final
    r = nextstep(*base, "-o", str(tmp_path / "bad.png"), "--preview-every", "0")
    assert r.returncode == 2 and "argument --preview-every: must be > 0, got 0" in r.stderr


@pytest.mark.parametrize(
    "argv", [["train", "--bogus"], ["export"], ["eval", "shapes", "--split", "x"], ["models", "-x"]]
)
def test_forwarded_commands_report_a_bad_command_line_as_one_line(capsys, argv):
    """Every command's parser (nextstep.args.ArgumentParser) prints one `nextstep: error:` line, no usage block."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nextstep: error: ") and err.count("\n") == 1, err
