"""The tuning cache on disk (CPU): where it lives, round trip between processes, merging, corrupt and stale
files ignored with a warning; and that the fp8/int8 GEMM Tuner and the fused head's `tune` read it instead
of timing again (the timing itself faked: it needs a GPU)."""

from __future__ import annotations

import dataclasses
import json
import logging
import types

import pytest
import torch

from nextstep.model.head import AdaLNMLP
from nextstep.sampling import head_kernels, quant_kernels, tuning
from nextstep.sampling.quantize import quantize_linear, quantize_linears

GPU = "NVIDIA H200"
PACKAGE_TABLES = tuning.SHIPPED  # the tables shipped with the package (the fixture hides them from the cache)
Head = head_kernels.LaunchConfig


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    """An empty user cache and no shipped tables (the package's H200 table would answer "NVIDIA H200")."""
    monkeypatch.setenv("NEXTSTEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "SHIPPED", tmp_path / "shipped")
    return tmp_path


def test_path_per_gpu_under_cache_dir(cache_root, monkeypatch):
    assert tuning.cache_path(GPU) == cache_root / "tuning" / "NVIDIA_H200.json"
    assert tuning.cache_path("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"
    assert tuning.cache_path("a/../b").parent == cache_root / "tuning"  # no path escapes the folder
    monkeypatch.delenv("NEXTSTEP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(cache_root / "home"))
    assert tuning.cache_path(GPU) == cache_root / "home" / ".cache" / "nextstep" / "tuning" / "NVIDIA_H200.json"


def test_round_trip_and_merge():
    a = tuning.TuningCache(GPU)
    assert a.get("head", "bfloat16/bfloat16/2/1536", Head) is None
    a.put("head", "bfloat16/bfloat16/2/1536", Head(4, 512, 8))
    b = tuning.TuningCache(GPU)  # another process, started later
    gemm = quant_kernels.LaunchConfig(32, 256, 1, 4, 4)
    b.put("quant_linear", tuning.entry_key("float8_e4m3fn", 16, 7168, 5120), gemm)
    a.put("head", "bfloat16/bfloat16/4/1536", Head(8, 256, 4))  # merges with b's entry, does not drop it
    c = tuning.TuningCache(GPU)
    assert c.get("head", "bfloat16/bfloat16/2/1536", Head) == Head(4, 512, 8)
    assert c.get("head", "bfloat16/bfloat16/4/1536", Head) == Head(8, 256, 4)
    assert c.get("quant_linear", "float8_e4m3fn/16/7168/5120", quant_kernels.LaunchConfig) == gemm
    assert tuning.TuningCache("NVIDIA H100 80GB HBM3").get("head", "bfloat16/bfloat16/2/1536", Head) is None
    assert not list(c.path.parent.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"triton": "x", "head": 3}', ""])
def test_corrupt_file_is_ignored_with_a_warning(text, caplog):
    path = tuning.cache_path(GPU)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        cache = tuning.TuningCache(GPU)
    assert cache.get("head", "k", Head) is None and str(path) in caplog.text
    cache.put("head", "k", Head(2))  # replaced by a good file
    assert tuning.TuningCache(GPU).get("head", "k", Head) == Head(2)


def test_entry_of_other_fields_is_ignored(caplog):
    """An entry written by another version of a kernel (other launch fields) is tuned again, not a crash."""
    cache = tuning.TuningCache(GPU)
    cache.put("head", "k", quant_kernels.LaunchConfig(32, 256, 1, 4, 4))
    with caplog.at_level(logging.WARNING):
        assert tuning.TuningCache(GPU).get("head", "k", Head) is None
    assert "split_k" in caplog.text


def test_other_triton_version_is_ignored(caplog):
    cache = tuning.TuningCache(GPU)
    cache.put("head", "k", Head(2))
    data = json.loads(cache.path.read_text())
    cache.path.write_text(json.dumps({**data, "triton": "0.0.1"}))
    with caplog.at_level(logging.WARNING):
        assert tuning.TuningCache(GPU).get("head", "k", Head) is None
    assert "0.0.1" in caplog.text


def test_unwritable_cache_only_warns(cache_root, caplog):
    (cache_root / "tuning").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        cache = tuning.TuningCache(GPU)
        cache.put("head", "k", Head(2))
    assert cache.get("head", "k", Head) == Head(2) and "could not write" in caplog.text


def test_shipped_table_answers_what_the_users_cache_lacks(tmp_path, monkeypatch, caplog):
    """A fresh machine (no user cache) reads the package's table of its GPU; the user's entries win; a shipped
    table of another Triton is skipped without a warning (it is the package's, not the user's)."""
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(tuning, "SHIPPED", shipped)
    version = tuning.TuningCache(GPU).version
    write = lambda triton: tuning.write_json(  # noqa: E731
        tuning.cache_path(GPU, shipped), {"triton": triton, "head": {"a": {"block_n": 8}, "b": {"block_n": 2}}}
    )
    write(version)
    cache = tuning.TuningCache(GPU)
    assert cache.get("head", "a", Head) == Head(8) and cache.get("head", "c", Head) is None
    cache.put("head", "a", Head(4))
    assert not (shipped / "NVIDIA_H200.json").read_text().count('"block_n": 4')  # the shipped file is never written
    again = tuning.TuningCache(GPU)
    assert again.get("head", "a", Head) == Head(4) and again.get("head", "b", Head) == Head(2)
    write("0.0.1")
    with caplog.at_level(logging.WARNING):
        assert tuning.TuningCache(GPU).get("head", "b", Head) is None
    assert not caplog.records


@pytest.fixture
def fake_gpu(monkeypatch):
    """get_device_properties answers for a fake H200 (the tuners ask it for the GPU name and SM count)."""
    props = types.SimpleNamespace(name=GPU, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_gemm_tuner_reads_what_another_process_stored(fake_gpu, monkeypatch):
    timed = []
    best = quant_kernels.LaunchConfig(64, 256, 2, 8, 3)
    monkeypatch.setattr(quant_kernels, "candidates", lambda n, k, bucket, sms: [best])
    monkeypatch.setattr(quant_kernels, "_fastest", lambda found, *args: timed.append(found) or found[0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    layer = quantize_linear(torch.nn.Linear(48, 40), "fp8")
    x = torch.randn(2, 48)
    assert quant_kernels.Tuner().config(x, layer.weight, layer.scale, layer.bias) == best
    assert len(timed) == 1
    stored = json.loads(tuning.cache_path(GPU).read_text())["quant_linear"]
    assert stored == {
        "float8_e4m3fn/16/40/48": {"block_n": 64, "block_k": 256, "split_k": 2, "num_warps": 8, "num_stages": 3}
    }
    second = quant_kernels.Tuner()  # a new process: reads the file, times nothing
    assert second.config(x, layer.weight, layer.scale, layer.bias) == best and len(timed) == 1
    assert list(second.table) == [(GPU, "float8_e4m3fn", 16, 40, 48)]
    other_rows = torch.randn(20, 48)  # another row bucket is another entry: timed
    quant_kernels.Tuner().config(other_rows, layer.weight, layer.scale, layer.bias)
    assert len(timed) == 2
    quant_kernels.Tuner(persist=False).config(x, layer.weight, layer.scale, layer.bias)
    assert len(timed) == 3  # memory only: times again


def test_head_tune_reads_what_another_process_stored(fake_gpu, monkeypatch):
    timed = []
    best = head_kernels.LaunchConfig(4, 512, 8)
    monkeypatch.setattr(head_kernels, "_fastest", lambda net, rows, device: timed.append(rows) or best)
    net = AdaLNMLP(16, 40, 48, 2).to(torch.bfloat16)
    cuda = torch.device("cuda")
    assert head_kernels.tune(net, 2, cuda) == best and timed == [2]
    assert head_kernels.tune(net, 2, cuda) == best and timed == [2]  # from disk
    assert tuning.TuningCache(GPU).get("head", "bfloat16/bfloat16/2/48", Head) == best
    head_kernels.tune(net, 4, cuda)
    quantize_linears(net, "fp8", tuner=quant_kernels.Tuner())
    head_kernels.tune(net, 2, cuda)  # fp8 weights: their own entry
    assert timed == [2, 4, 2]
    assert tuning.TuningCache(GPU).get("head", "float8_e4m3fn/bfloat16/2/48", Head) == best
    assert head_kernels.tune(net, 2, torch.device("cpu")) == head_kernels.LaunchConfig()  # off CUDA: the default
    assert head_kernels.tune(net, 64, torch.device("cpu")) == head_kernels.default_config(64)  # tl.dot's default
    head_kernels.tune(net, 2, cuda, persist=False)
    assert timed == [2, 4, 2, 2]


def test_shipped_tables_hold_launch_configs_of_their_kernels():
    """Every table shipped with the package (copied from a GPU run's cache) names a Triton version and holds
    only entries that build the kernel's own launch configuration: a hand-edited or stale one fails here."""
    kinds = {"head": head_kernels.LaunchConfig, "quant_linear": quant_kernels.LaunchConfig}
    tables = sorted(PACKAGE_TABLES.glob("*.json"))
    assert tables, f"no shipped tuning table in {PACKAGE_TABLES}"
    for path in tables:
        data = json.loads(path.read_text())
        assert isinstance(data.pop("triton"), str), path
        assert set(data) <= set(kinds), (path, set(data))
        for kernel, entries in data.items():
            assert entries, (path, kernel)
            for key, entry in entries.items():
                config = kinds[kernel](**entry)  # TypeError on fields of another kernel version
                assert all(v > 0 for v in dataclasses.asdict(config).values() if isinstance(v, int)), (path, key)
