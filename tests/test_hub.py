"""Model names against a real huggingface_hub cache laid out on disk (HF_HUB_OFFLINE=1, no network): Hub ids,
revisions, zoo names, the release VAE for checkpoints without vae/, offline errors, `nextstep models`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants

import nextstep
from nextstep.assets import builtin_model_dir
from nextstep.hub import HubRef, main_download, main_models, parse_hub_ref, resolve_model_dir
from nextstep.train import loop
from nextstep.train.config import apply_overrides
from tests.refs import ROOT
from tests.train.test_loop import latent_batches, tiny_cfg

TINY11 = ROOT / "nextstep11-tiny"
TINY1 = ROOT / "nextstep-tiny"
COMMIT = "a" * 40
REPO = Path(__file__).parents[1]


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], *, commit: str = COMMIT, refs=("main",)) -> Path:
    """Lay out `files` (path in repo -> source) as huggingface_hub stores a download: blobs named by content hash,
    snapshots/<commit>/ of relative symlinks to them, refs/<name> holding the commit. Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def checkpoint_files(src: Path, *, vae: bool = True) -> dict[str, Path]:
    """A checkpoint's files as the release ships them (not the reference outputs the test copies carry)."""
    files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}
    return {
        k: v for k, v in files.items() if not k.startswith("reference/") and k != "README.md" and (vae or "/" not in k)
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline huggingface_hub cache in tmp_path holding stepfun-ai/NextStep-1.1 (main and tag v1)."""
    cache, home = tmp_path / "hub", tmp_path / "home"
    for name, value in (("HF_HUB_CACHE", cache), ("HF_HOME", home), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, "1" if value is True else str(value))
        monkeypatch.setattr(constants, name, value if value is True else str(value))  # read once, at import
    cache_repo(cache, "stepfun-ai/NextStep-1.1", checkpoint_files(TINY11), refs=("main", "v1"))
    return cache


def pixels(pipe) -> np.ndarray:
    return np.asarray(pipe.generate("a red circle", size=(32, 32), steps=2, seed=0)[0])


def test_parse_names_ids_and_revisions():
    assert parse_hub_ref("stepfun-ai/NextStep-1.1") == HubRef("stepfun-ai/NextStep-1.1")
    assert parse_hub_ref("nextstep-1.1-pretrain-256px") == HubRef("stepfun-ai/NextStep-1.1-Pretrain-256px")
    assert parse_hub_ref("NextStep-1-Large-Edit@v2") == HubRef("stepfun-ai/NextStep-1-Large-Edit", "v2")
    assert parse_hub_ref("me/my-model@" + COMMIT) == HubRef("me/my-model", COMMIT)
    for path in ("./model", "/abs/model", "runs/shapes/stage1", "model", "../x"):
        assert parse_hub_ref(path) is None
    with pytest.raises(ValueError, match="empty revision"):
        parse_hub_ref("nextstep-1.1@")


def test_hub_id_zoo_name_and_revisions_load_from_the_cache(hub):
    snapshot = hub / "models--stepfun-ai--NextStep-1.1" / "snapshots" / COMMIT
    for name in ("stepfun-ai/NextStep-1.1", "nextstep-1.1", "NextStep-1.1@v1", f"stepfun-ai/NextStep-1.1@{COMMIT}"):
        assert resolve_model_dir(name) == snapshot
    pipe = nextstep.load("stepfun-ai/NextStep-1.1", device="cpu")
    image = pixels(pipe)
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, pixels(nextstep.load(TINY11, device="cpu")))


def test_local_directory_and_builtin_win(hub, tmp_path, monkeypatch):
    local = tmp_path / "stepfun-ai" / "NextStep-1.1"
    shutil.copytree(TINY11, local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("stepfun-ai/NextStep-1.1") == Path("stepfun-ai/NextStep-1.1")
    assert resolve_model_dir(None) == resolve_model_dir("shapes") == builtin_model_dir()


def test_uncached_model_or_revision_is_one_clear_offline_error(hub):
    for name, fix in (
        ("nextstep-1.1@v2", "stepfun-ai/NextStep-1.1@v2"),
        ("nextstep-1-large", "stepfun-ai/NextStep-1-Large"),
    ):
        with pytest.raises(FileNotFoundError) as e:
            resolve_model_dir(name)
        assert f"nextstep download {fix}" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(FileNotFoundError, match="model directory not found: runs/x/y"):
        resolve_model_dir("runs/x/y")


def test_checkpoint_without_vae_gets_the_release_vae(hub):
    cache_repo(hub, "stepfun-ai/NextStep-1-Large", checkpoint_files(TINY1, vae=False), commit="b" * 40)
    with pytest.raises(FileNotFoundError, match="nextstep download stepfun-ai/NextStep-1-Large"):
        resolve_model_dir("nextstep-1-large")  # the VAE is not cached yet
    cache_repo(hub, "stepfun-ai/NextStep-1-f8ch16-Tokenizer", {p.name: p for p in (TINY1 / "vae").iterdir()})
    model_dir = resolve_model_dir("nextstep-1-large")
    assert model_dir.is_relative_to(constants.HF_HOME) and (model_dir / "vae" / "checkpoint.pt").is_file()
    assert resolve_model_dir("nextstep-1-large") == model_dir  # reused
    np.testing.assert_array_equal(
        pixels(nextstep.load(model_dir, device="cpu")), pixels(nextstep.load(TINY1, device="cpu"))
    )


def test_models_marks_cached_and_download_prints_the_directory(hub, capsys):
    assert main_models([]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert " yes " in rows["nextstep-1.1"] and " no " in rows["nextstep-1.1-pretrain"]
    assert (
        " yes " in rows["shapes"]
        and "recommended" in rows["nextstep-1.1"]
        and "fine-tune" in rows["nextstep-1.1-pretrain-256px"]
    )
    assert main_download(["nextstep-1.1"]) == 0
    assert capsys.readouterr().out.strip() == str(hub / "models--stepfun-ai--NextStep-1.1" / "snapshots" / COMMIT)


def test_cli_offline_error_is_one_line_exit_2(hub, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (
        ["generate", "a cat", "--model", "nextstep-1-large"],
        ["download", "nextstep-1-large"],
        ["download", "nextstep-1-large", str(tmp_path / "ckpt")],
    ):
        r = subprocess.run([sys.executable, "-m", "nextstep.cli", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("nextstep: error: ") and r.stderr.count("\n") == 1
        assert "nextstep download stepfun-ai/NextStep-1-Large" in r.stderr


def test_training_model_path_takes_a_zoo_name(hub, tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=1, save_steps=1)
    cfg = apply_overrides(cfg, ["model.init=pretrained", "model.path=nextstep-1.1", "model.tokenizer_dir="])
    loop.train(cfg, data=latent_batches(1, 2))
    assert cfg.model.path == str(hub / "models--stepfun-ai--NextStep-1.1" / "snapshots" / COMMIT)  # tokenizer too
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()


def test_model_name_is_the_repo_name_not_the_cache_path(tmp_path):
    """The server reports a Hub model by its name, not by the commit-hash folder the cache resolves it to."""
    from nextstep.hub import model_name

    assert model_name("stepfun-ai/NextStep-1.1@v1") == "NextStep-1.1"
    assert model_name("nextstep-1-large-edit") == "NextStep-1-Large-Edit"
    assert model_name(None) == model_name("shapes") == builtin_model_dir().name
    (tmp_path / "my-ckpt").mkdir()
    assert model_name(tmp_path / "my-ckpt") == "my-ckpt"
