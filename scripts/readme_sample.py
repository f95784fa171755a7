"""Write docs/builtin_samples.png, the README's picture: fixed prompts, seed 0, the built-in model's
defaults, every output shown (none picked). Run: python scripts/readme_sample.py"""

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from nextstep.assets import builtin_model_dir
from nextstep.io import write_bytes
from nextstep.sampling.pipeline import Pipeline

PROMPTS = [
    "a red circle",
    "a blue star on the left",
    "two green squares",
    "a yellow heart above a purple ring",
    "a white cross and an orange triangle",
    "three cyan hexagons",
]


def main() -> int:
    pipe = Pipeline.from_pretrained(builtin_model_dir())
    images = pipe.generate(PROMPTS, seed=0)
    tile, text_h = 160, 34
    grid = Image.new("RGB", (tile * len(PROMPTS), tile + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        grid.paste(image.resize((tile - 8, tile - 8), Image.NEAREST), (i * tile + 4, 4))
        words = prompt.split()
        half = (len(words) + 1) // 2
        for j, line in enumerate((" ".join(words[:half]), " ".join(words[half:]))):
            draw.text((i * tile + 6, tile + j * 14), line, fill="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    out = Path(__file__).resolve().parent.parent / "docs" / "builtin_samples.png"
    write_bytes(out, buf.getvalue())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
