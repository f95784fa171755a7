"""How fast are the data tools? build-wds, gen_meta, warmup and the loader on N generated samples.

    python3 bench/data_tools.py --n 10000 --size 256 --workers 2

Prints one JSON line per result: {"what", "config", "device", "number", "unit"}. The baseline writes the
same files into tars with plain tarfile (no decoding, validation or re-encoding).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nextstep.data.config import DataConfig, DatasetSpec
from nextstep.data.tools import build_wds, gen_meta, warmup_index
from nextstep.data.wds import build_dataloader


def make_manifest(root: Path, n: int, size: int) -> Path:
    """n text-to-image samples: smooth noisy PNGs (photo-like compressibility) and a JSONL manifest."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    (root / "img").mkdir(parents=True)
    with open(root / "m.jsonl", "w") as f:
        for i in range(n):
            base = (np.sin(xx / (8 + i % 13)) + np.cos(yy / (5 + i % 7))) * 60 + 128
            pixels = base[..., None] + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
            f.write(json.dumps({"key": f"s{i}", "caption": f"sample {i} <image_0>", "images": [f"img/{i}.png"]}))
            f.write("\n")
    return root / "m.jsonl"


def baseline_tar(manifest: Path, out: Path, shard_size: int) -> None:
    """Plain tarfile: copy the JSON and PNG bytes as they are."""
    out.mkdir()
    docs = [json.loads(line) for line in manifest.read_text().splitlines()]
    for s in range(0, len(docs), shard_size):
        with tarfile.open(out / f"data-{s // shard_size:06d}.tar", "w") as tar:
            for doc in docs[s : s + shard_size]:
                members = [(f"{doc['key']}.json", json.dumps({"caption": doc["caption"]}).encode())]
                members += [
                    (f"{doc['key']}-{i}.png", (manifest.parent / p).read_bytes()) for i, p in enumerate(doc["images"])
                ]
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="samples")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--loader-batches", type=int, default=100, help="batches timed for the loader")
    args = p.parse_args()
    device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"

    def emit(what: str, config: dict, number: float, unit: str = "samples/s") -> None:
        cfg = {"n": args.n, "size": args.size, "shard_size": args.shard_size, **config}
        print(json.dumps({"what": what, "config": cfg, "device": device, "number": round(number, 1), "unit": unit}))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_manifest(root / "raw", args.n, args.size)
        emit(
            "baseline plain tarfile write",
            {},
            args.n / timed(lambda: baseline_tar(manifest, root / "base", args.shard_size)),
        )
        for workers in sorted({1, args.workers}):
            out = root / f"shards{workers}"
            t = timed(lambda o=out, w=workers: build_wds(manifest, o, shard_size=args.shard_size, workers=w))
            emit("build_wds", {"workers": workers}, args.n / t)
        shards = root / f"shards{args.workers}"
        for workers in sorted({1, args.workers}):
            (shards / "meta.json").unlink(missing_ok=True)
            emit(
                "gen_meta (cold)",
                {"workers": workers},
                args.n / timed(lambda w=workers: gen_meta(shards, workers=w)),
            )
        emit("gen_meta (unchanged, incremental)", {}, args.n / timed(lambda: gen_meta(shards)))
        emit(
            "warmup_data",
            {"workers": args.workers},
            args.n / timed(lambda: warmup_index(shards, n_jobs=args.workers)),
        )
        for num_workers in sorted({0, args.workers}):
            cfg = DataConfig(
                datasets=[DatasetSpec(shards=str(shards))],
                image_size=256,
                batch_size=16,
                num_workers=num_workers,
            )
            it = iter(build_dataloader(cfg))
            next(it)  # worker start-up and buffer fill excluded
            t = timed(lambda it=it: list(itertools.islice(it, args.loader_batches)))
            emit(
                "loader decode+resize 256px",
                {"num_workers": num_workers, "batch": 16},
                args.loader_batches * 16 / t,
            )


if __name__ == "__main__":
    main()
