"""The GPU scripts (scripts/train_builtin.sh, scripts/rl_builtin.sh) refuse bad settings before any work: exit 2
with one line naming the bad value, nothing written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(tmp_path: Path, script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The script from an empty working directory (its relative paths land there)."""
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STAGES": "5"}, "STAGES must be 2, 3, 3a or 4, not '5'"),
        ({"STAGES": "2", "STAGE2": "x"}, "STAGE2 is stage 2's export: STAGES must be 3, 3a or 4"),
        ({"STAGES": "3", "STAGE3": "x"}, "STAGE3 is stage 3's export: STAGES must be 4"),
        ({"STAGES": "4", "STAGE3": "/nonexistent"}, "/nonexistent is not a model export: no config.json"),
    ],
)
def test_train_builtin_refuses_bad_stages(tmp_path, env, message):
    r = run(tmp_path, "train_builtin.sh", env)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_rl_builtin_refuses_a_base_that_is_no_export(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # no sampling_defaults.json
    for base in ("/nonexistent", "half"):
        r = run(tmp_path, "rl_builtin.sh", {"BASE": base, "OUT": "out", "WORK": "work"}, "10")
        assert r.returncode == 2 and f"BASE={base} is not a model export with sampling defaults" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]
