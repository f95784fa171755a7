"""Streamlit data preview: samples of a shard folder or data config, caption/resolution histograms, mixture.

nextstep data preview shards/ --port 8501   # on localhost; --host 0.0.0.0 to serve other machines
streamlit run nextstep/data/preview.py --server.port 8501 --server.address localhost \
    --browser.gatherUsageStats false -- shards/   # same thing
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from nextstep.args import ArgumentParser
from nextstep.data.config import DataConfig
from nextstep.data.format import Sample, caption_segments, decode_sample, iter_raw_samples
from nextstep.data.index import META_NAME
from nextstep.data.stream import expand_shards, open_shard

log = logging.getLogger(__name__)


def load_config(path: str | Path) -> DataConfig:
    """DataConfig from a JSON file holding its fields."""
    return DataConfig(**json.loads(Path(path).read_text()))


def load_samples(shards: list[str], limit: int) -> tuple[list[Sample], list[str]]:
    """Up to `limit` samples read in order from `shards`, and one error line per bad sample (named by shard
    and key; the rest of its shard is shown) or unreadable shard."""
    samples, errors = [], []
    for url in shards:
        if len(samples) >= limit:
            break
        try:
            with open_shard(url) as f:
                for raw in iter_raw_samples(f):
                    try:
                        samples.append(decode_sample(raw))
                    except ValueError as e:
                        errors.append(f"{url}: {e}")
                    if len(samples) >= limit:
                        break
        except Exception as e:  # a preview shows what it can and lists the rest
            errors.append(f"{url}: {type(e).__name__}: {e}")
    return samples, errors


def histogram(values: list[float], bins: int = 20) -> dict[str, int]:
    """Bin label -> count, in bin order, for a bar chart."""
    if not values:
        return {}
    counts, edges = np.histogram(values, bins=bins)
    return {f"{edges[i]:.0f}-{edges[i + 1]:.0f}": int(c) for i, c in enumerate(counts)}


def resolution_counts(samples: list[Sample]) -> dict[str, int]:
    """ "WxH" -> number of images, most common first."""
    return dict(Counter(f"{im.width}x{im.height}" for s in samples for im in s.images).most_common())


def sample_kind(sample: Sample) -> str:
    """text-only, text-to-image, editing or interleaved, from the order of text and images."""
    shape = "".join("i" if isinstance(seg, int) else "t" for seg in caption_segments(sample.caption))
    if "i" not in shape:
        return "text-only"
    if shape in ("ti", "it"):
        return "text-to-image"
    if shape == "iti":
        return "editing"
    return "interleaved"


def num_samples(shards: list[str]) -> int | None:
    """Total sample count from the meta.json beside the shards, None if any shard is not listed."""
    total = 0
    metas: dict[Path, dict] = {}
    for url in shards:
        path = Path(url)
        if path.parent not in metas:
            try:
                metas[path.parent] = json.loads((path.parent / META_NAME).read_text())["shards"]
            except (OSError, ValueError, KeyError):
                return None
        entry = metas[path.parent].get(path.name)
        if entry is None:
            return None
        total += entry["count"]
    return total


def mixture_table(cfg: DataConfig) -> list[dict]:
    """One row per dataset: name, weight, share of draws, shard count and sample count (if meta.json)."""
    total = sum(spec.weight for spec in cfg.datasets)
    rows = []
    for spec in cfg.datasets:
        shards = expand_shards(spec.shards)
        rows.append(
            {
                "dataset": spec.name,
                "weight": spec.weight,
                "share": round(spec.weight / total, 4),
                "shards": len(shards),
                "samples": num_samples(shards),
            }
        )
    return rows


def _show_sample(st, sample: Sample) -> None:
    st.markdown(f"**{sample.key}** · {sample_kind(sample)} · {len(sample.images)} image(s)")
    for seg in caption_segments(sample.caption):
        if isinstance(seg, int):
            im = sample.images[seg]
            st.image(im.convert("RGB"), caption=f"<image_{seg}> {im.width}x{im.height}", width=256)
        elif seg.strip():
            st.text(seg.strip())
    if sample.meta:
        st.json(sample.meta, expanded=False)


def render(default_path: str = "") -> None:
    """The app: source picker in the sidebar, then mixture, stats and the sample grid."""
    import streamlit as st

    st.set_page_config(page_title="nextstep data preview", layout="wide")
    st.title("NextStep data preview")
    path = st.sidebar.text_input("Shard folder, shard pattern or data config (.json)", value=default_path)
    limit = st.sidebar.number_input("Samples to read", min_value=1, max_value=10000, value=48)
    columns = st.sidebar.slider("Grid columns", 1, 6, 3)
    if not path:
        st.info("Enter a shard folder (e.g. shards/), a pattern (data-{000000..000009}.tar) or a config JSON.")
        return
    try:
        if path.endswith(".json"):
            cfg = load_config(path)
            st.header("Mixture")
            rows = mixture_table(cfg)
            st.dataframe(rows)
            st.bar_chart({r["dataset"]: r["share"] for r in rows})
            name = st.sidebar.selectbox("Dataset", [r["dataset"] for r in rows])
            spec = next(s for s in cfg.datasets if s.name == name)
            shards = expand_shards(spec.shards)
        else:
            shards = expand_shards(path)
    except (OSError, ValueError, TypeError) as e:
        st.error(f"cannot load {path}: {e}")
        return
    if not shards:
        st.warning(f"no shards found at {path}")
        return
    shard = st.sidebar.selectbox("Start at shard", shards)
    samples, errors = load_samples(shards[shards.index(shard) :], int(limit))
    for error in errors:
        st.error(error)
    st.header(f"{len(samples)} samples from {len(shards)} shard(s)")
    left, mid, right = st.columns(3)
    left.subheader("Caption length (chars)")
    left.bar_chart(histogram([len(s.caption) for s in samples]))
    mid.subheader("Resolution (WxH)")
    mid.bar_chart(resolution_counts(samples))
    right.subheader("Kinds")
    right.bar_chart(dict(Counter(sample_kind(s) for s in samples)))
    grid = st.columns(columns)
    for i, sample in enumerate(samples):
        with grid[i % columns]:
            _show_sample(st, sample)


def main_preview(argv: list[str] | None = None) -> int:
    """Launch the preview app: nextstep data preview [PATH] [--port 8501] [--host localhost]. It listens on
    this machine only unless --host says otherwise (0.0.0.0: every interface), and sends Streamlit no usage
    statistics."""
    p = ArgumentParser(prog="nextstep data preview", description=main_preview.__doc__)
    p.add_argument("path", nargs="?", default="", help="shard folder, shard pattern or data config JSON")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="localhost", help="address to listen on (default: localhost)")
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "streamlit", "run", __file__, "--server.port", str(args.port)]
    cmd += ["--server.address", args.host, "--browser.gatherUsageStats", "false", "--", args.path]
    return subprocess.call(cmd)


if __name__ == "__main__":  # executed by `streamlit run`
    render(sys.argv[1] if len(sys.argv) > 1 else "")
