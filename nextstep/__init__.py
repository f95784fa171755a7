"""nextstep: NextStep-1 / NextStep-1.1 autoregressive image generation with continuous tokens.

import nextstep
pipe = nextstep.load("stepfun-ai/NextStep-1.1")  # or a directory, a zoo name; nextstep.load(): the built-in model
image = pipe.generate("a red fox in the snow", size=(512, 512), seed=0)[0]
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path: str | Path | None = None, *, device=None, dtype=None, quantize: str = "none"):
    """A text-to-image / editing pipeline from a checkpoint directory, a Hugging Face id (`owner/name[@revision]`)
    or a zoo name (`nextstep models`); default: the built-in model.

    device/dtype default to cuda + bfloat16 when available, else cpu + float32; quantize: none | int8 | fp8.
    """
    from nextstep.hub import resolve_model_dir
    from nextstep.sampling.pipeline import Pipeline

    model_dir = resolve_model_dir(path)
    return Pipeline.from_pretrained(model_dir, device=device, dtype=dtype, quantize=quantize)
