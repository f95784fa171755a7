"""The shard index beside a shard directory: names of meta.json (gen_meta) and index.json (warmup_data), and
`load_index`, which returns the index entries still valid for the files on disk. Written by
`nextstep.data.tools`, read by the training stream (`nextstep.data.stream`) and the data preview."""

from __future__ import annotations

import json
import os
from pathlib import Path

META_NAME = "meta.json"  # gen_meta output, beside the shards
INDEX_NAME = "index.json"  # warmup_data output, beside the shards


def read_json(path: Path) -> dict:
    """The JSON object in `path`, {} when it is missing or unreadable (then the index is simply not used)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_index(root: str | os.PathLike) -> dict[str, dict]:
    """Index entries (by shard path) whose sha256/size match meta.json and whose file is unchanged since."""
    root = Path(root)
    meta = read_json(root / META_NAME).get("shards", {})
    index = read_json(root / INDEX_NAME).get("shards", {})
    out = {}
    for name, entry in index.items():
        m = meta.get(name)
        path = root / name
        if m is None or (entry["sha256"], entry["size"]) != (m["sha256"], m["size"]) or not path.exists():
            continue
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) == (m["size"], m["mtime"]):
            out[str(path)] = entry
    return out
