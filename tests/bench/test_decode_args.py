"""bench/decode.py refuses a bad --layer-kernels or --pdl list, and layer kernels `on` with --compile (which compiles
its own layer), before touching a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.bench.test_quant_bench import ROOT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layer-kernels", "off,fast"], "--layer-kernels takes a comma list of off, on, got 'off,fast'"),
        (["--layer-kernels", ""], "--layer-kernels takes a comma list of off, on"),
        (["--layer-kernels", "off,on", "--compile"], "--layer-kernels on does not combine with --compile"),
        (["--pdl", "off,fast"], "--pdl takes a comma list of off, on, got 'off,fast'"),
        (["--pdl", ""], "--pdl takes a comma list of off, on, got ''"),
        # --compile alone takes the layer kernels off by default: it gets as far as asking for the GPU
        *([(["--compile"], "timing the engine needs a CUDA device")] if not torch.cuda.is_available() else []),
    ],
)
def test_bad_layer_kernels_or_pdl_argument(argv, message):
    r = subprocess.run(
        [sys.executable, "bench/decode.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
