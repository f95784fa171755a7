"""Training metrics sinks: metrics.jsonl always; wandb offline (no key, no network)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from nextstep.train.metrics import MetricsWriter, read_wandb_dotconfig


def test_dotconfig_sets_only_unset_wandb_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://kept")
    (tmp_path / ".config").write_text("WANDB_MODE=offline\nWANDB_BASE_URL=http://ignored\nOTHER=1\n")
    read_wandb_dotconfig(tmp_path / ".config")
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_BASE_URL"] == "http://kept"
    assert "OTHER" not in os.environ


def test_wandb_offline_run_with_metrics_and_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path / "run", enabled=True, run_name="t", config={"lr": 1e-3}, wandb=True)
    for step in range(3):
        writer.log(step, {"loss": 1.0 / (step + 1)})
    writer.log_images(2, [Image.new("RGB", (8, 8), "red")], ["a red square"])
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "wandb should fall back to an offline run when no API key is set"
    assert list(runs[0].glob("*.wandb")), "the offline run holds its event log"
    assert (tmp_path / "run" / "samples" / "step00000002_0.png").is_file()
