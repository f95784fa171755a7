"""Procedural captioned shape scenes (text-to-image, editing, interleaved) written as training shards.

Sample `i` depends only on (seed, i), so output is the same for any number of workers:

    nextstep data synth-shapes OUT --n 1000000 --seed 0 --workers 16

Held-out color-shape pairs and relations (`nextstep.shapes.scenes.HELDOUT_*`) never appear here.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import random
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

from nextstep.args import ArgumentParser
from nextstep.data.format import Sample, ShardWriter, shard_path
from nextstep.io import write_json
from nextstep.shapes.scenes import (
    COLORS,
    INVERSE,
    REGION_PHRASES,
    REGIONS,
    RELATION_PHRASES,
    RELATIONS,
    SIZES,
    TRAIN_PAIRS,
    Background,
    Edit,
    Obj,
    Scene,
    apply_edit,
    edit_text,
    in_region,
    is_heldout_relation,
    join_phrases,
    noun_phrase,
    place,
    render,
)

log = logging.getLogger(__name__)

KINDS = {"t2i": 0.7, "edit": 0.2, "interleaved": 0.1}  # sample kind -> probability
T2I_MODES = {"objects": 0.4, "count": 0.2, "position": 0.2, "relation": 0.2}  # what a caption stresses
EDIT_OPS = ("recolor", "move", "add", "remove")
P_NO_COLOR = 0.15  # captions that name shapes only, as GenEval's color-free prompts do
P_GROUP_RELATION = 0.0  # relation captions with a counted group on one side ("two red circles above a star")
P_SIZE = 0.3  # captions that name sizes (where a group shares one)
P_BACKGROUND = 0.2  # captions that describe the background
P_ADD_REGION = 0.5  # "add" instructions that say where
# "" repeated so that most captions are in the plain form the eval prompts use.
PREFIXES = ("", "", "", "", "a picture of ", "an image of ", "a drawing of ", "a simple scene with ")
SCENE_LINKS = (" then ", " and next, ", ". Now ", " followed by ")
EDIT_LINKS = (" now ", ". Next, ", " then ")


def sample_rng(seed: int, index: int) -> random.Random:
    """The RNG of sample `index`: string seeds hash with sha512, so it is stable across runs and hosts."""
    return random.Random(f"synth-shapes:{seed}:{index}")


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def random_background(rng: random.Random) -> Background:
    """A dark or mid gray, slightly tinted, plain, noisy or striped background."""
    gray = rng.randint(15, 70) if rng.random() < 0.6 else rng.randint(95, 135)
    color = tuple(gray + rng.randint(-8, 8) for _ in range(3))
    texture = rng.choice(("plain", "noise", "stripes"))
    amount = {"plain": 0, "noise": rng.randint(3, 8), "stripes": rng.randint(6, 14)}[texture]
    return Background(color, texture, amount, rng.randint(4, 12), rng.getrandbits(32))


def _background_phrase(bg: Background) -> str:
    tone = "dark" if sum(bg.color) < 3 * 80 else "gray"
    return f" on a {tone}{' striped' if bg.texture == 'stripes' else ''} background"


def random_objects(
    rng: random.Random, n: int, *, pairs: tuple[tuple[str, str], ...] = TRAIN_PAIRS, by_color: bool = True
) -> list[Obj]:
    """`n` objects with distinct descriptions: distinct (color, shape), or shapes if not `by_color`."""
    objs: list[Obj] = []
    while len(objs) < n:
        color, shape = rng.choice(pairs)
        if all((o.color, o.shape) != (color, shape) and (by_color or o.shape != shape) for o in objs):
            objs.append(Obj(shape, color, rng.choice(tuple(SIZES))))
    return objs


def random_scene(rng: random.Random, n: int, *, pairs: tuple[tuple[str, str], ...] = TRAIN_PAIRS) -> Scene:
    """A scene of `n` distinctly colored-and-shaped objects at random free places."""
    while True:
        objs = random_objects(rng, n, pairs=pairs)
        if place(objs, rng):
            return Scene(objs, random_background(rng))


def _group_phrases(objs: list[Obj], *, by_color: bool, by_size: bool) -> list[str]:
    groups: dict[tuple, list[Obj]] = {}
    for o in objs:
        groups.setdefault((o.color, o.shape) if by_color else (o.shape,), []).append(o)
    phrases = []
    for members in groups.values():
        sizes = {o.size for o in members}
        size = sizes.pop() if by_size and len(sizes) == 1 else None
        color = members[0].color if by_color else None
        phrases.append(noun_phrase(members[0].shape, color=color, size=size, count=len(members)))
    return phrases


def _phrase(o: Obj, *, by_color: bool, by_size: bool, count: int = 1) -> str:
    return noun_phrase(o.shape, color=o.color if by_color else None, size=o.size if by_size else None, count=count)


def sample_t2i(
    rng: random.Random, *, p_no_color: float = P_NO_COLOR, p_group_relation: float = P_GROUP_RELATION
) -> tuple[Scene, str]:
    """A scene and a caption that names every object truthfully (counts, regions, relations as chosen);
    with probability `p_no_color` the caption names shapes only, and with `p_group_relation` one side of a
    relation is a counted group. At 0 the latter draws nothing, so older streams stay as they were."""
    mode = _pick(rng, T2I_MODES)
    by_color = rng.random() >= p_no_color
    by_size = rng.random() < P_SIZE
    while True:
        regions, relations, group = None, [], None
        if mode == "objects":
            objs = [Obj(s, c, rng.choice(tuple(SIZES))) for c, s in rng.choices(TRAIN_PAIRS, k=rng.randint(1, 4))]
        elif mode == "count":
            color, shape = rng.choice(TRAIN_PAIRS)
            objs = [Obj(shape, color, rng.choice(tuple(SIZES))) for _ in range(rng.randint(2, 4))]
            if len(objs) < 4 and rng.random() < 0.4:
                objs += [o for o in random_objects(rng, 2, by_color=by_color) if o.shape != shape][:1]
        elif mode == "position":
            objs = random_objects(rng, rng.randint(1, 2), by_color=by_color)
            regions = rng.sample(REGIONS, len(objs))
        else:
            objs = random_objects(rng, rng.choice((2, 2, 3)), by_color=by_color)
            rel = rng.choice(RELATIONS)
            if is_heldout_relation(objs[0].shape, rel, objs[1].shape):
                continue
            relations = [(0, rel, 1)]
            if p_group_relation and rng.random() < p_group_relation:
                # One side becomes 2-3 copies, each the subject of a relation to the single object (place()
                # takes one relation per subject): "a star above two circles" = each circle below the star.
                side, count = rng.randrange(2), rng.randint(2, 3)
                objs = objs[:2] + [replace(objs[side]) for _ in range(count - 1)]
                group = (side, count)
                relations = [(i, rel if side == 0 else INVERSE[rel], 1 - side) for i in [side, *range(2, count + 1)]]
        if place(objs, rng, regions=regions, relations=relations):
            break
    if mode == "position":
        parts = [
            f"{_phrase(o, by_color=by_color, by_size=by_size)} {REGION_PHRASES[r]}"
            for o, r in zip(objs, regions, strict=True)
        ]
        text = join_phrases(parts)
    elif mode == "relation":
        sides = [_phrase(o, by_color=by_color, by_size=by_size) for o in objs[:2]]
        if group is not None:
            side, count = group
            sides[side] = _phrase(objs[side], by_color=by_color, by_size=by_size, count=count)
        text = f"{sides[0]} {rng.choice(RELATION_PHRASES[rel])} {sides[1]}"
        if group is None and len(objs) == 3:
            text += f" and {_phrase(objs[2], by_color=by_color, by_size=by_size)}"
    else:
        text = join_phrases(_group_phrases(objs, by_color=by_color, by_size=by_size))
    scene = Scene(objs, random_background(rng))
    text = rng.choice(PREFIXES) + text
    if rng.random() < P_BACKGROUND:
        text += _background_phrase(scene.background)
    return scene, text


def sample_edit(
    rng: random.Random,
    *,
    source: Scene | None = None,
    pairs: tuple[tuple[str, str], ...] = TRAIN_PAIRS,
    new_pairs: tuple[tuple[str, str], ...] = TRAIN_PAIRS,
    ops: tuple[str, ...] = EDIT_OPS,
) -> tuple[Scene, Edit, Scene]:
    """(source, edit, target): an edit of one uniquely described object of `source` (a random scene of
    1-3 objects from `pairs` if None); a recolored or added object takes its pair from `new_pairs`."""
    for _ in range(1000):
        src = source or random_scene(rng, rng.randint(1, 3), pairs=pairs)
        keys = Counter((o.color, o.shape) for o in src.objects)
        unique = [o for o in src.objects if keys[(o.color, o.shape)] == 1]
        op = rng.choice(ops)
        if (op != "add" and not unique) or (op == "remove" and len(src.objects) < 2):
            continue
        if op == "add" and len(src.objects) >= 4:
            continue
        if op == "add":
            free = [p for p in new_pairs if p not in keys]
            color, shape = rng.choice(free)
            region = rng.choice(REGIONS) if rng.random() < P_ADD_REGION else None
            edit = Edit("add", shape, color, region=region, size=rng.choice(tuple(SIZES)))
        else:
            t = rng.choice(unique)
            edit = Edit(op, t.shape, t.color)
            if op == "recolor":
                colors = [c for c in COLORS if (c, t.shape) in new_pairs and (c, t.shape) not in keys]
                if not colors:
                    continue
                edit.new_color = rng.choice(colors)
            elif op == "move":
                edit.region = rng.choice([r for r in REGIONS if not in_region(t.cx, t.cy, r, strict=False)])
        dst = apply_edit(src, edit, rng)
        if dst is not None:
            return src, edit, dst
    raise RuntimeError(f"no feasible edit among {ops} for scene {source}")


def make_sample(
    index: int,
    *,
    seed: int,
    size: int = 128,
    p_no_color: float = P_NO_COLOR,
    p_group_relation: float = P_GROUP_RELATION,
) -> Sample:
    """Sample `index` of the stream `seed`; its meta holds the ground truth of every image."""
    rng = sample_rng(seed, index)
    kind = _pick(rng, KINDS)
    edit = None
    if kind == "t2i":
        scene, text = sample_t2i(rng, p_no_color=p_no_color, p_group_relation=p_group_relation)
        scenes, caption = [scene], f"{text}<image_0>"
    elif kind == "edit":
        src, edit, dst = sample_edit(rng)
        scenes, caption = [src, dst], f"<image_0>{edit_text(edit, rng.randrange(3))}<image_1>"
    else:
        scene, text = sample_t2i(rng, p_no_color=p_no_color, p_group_relation=p_group_relation)
        edited = None
        if rng.random() >= 0.5:
            try:
                edited = sample_edit(rng, source=scene)
            except RuntimeError:  # e.g. four objects in two repeated pairs: nothing uniquely nameable
                edited = None
        if edited is None:
            other, text2 = sample_t2i(rng, p_no_color=p_no_color, p_group_relation=p_group_relation)
            scenes, caption = [scene, other], f"{text}<image_0>{rng.choice(SCENE_LINKS)}{text2}<image_1>"
        else:
            _, edit, dst = edited
            link = rng.choice(EDIT_LINKS)
            scenes, caption = (
                [scene, dst],
                f"{text}<image_0>{link}{edit_text(edit, rng.randrange(3))}<image_1>",
            )
    meta = {"kind": kind, "split": "train", "seed": seed, "index": index, "size": size, "p_no_color": p_no_color}
    meta["p_group_relation"] = p_group_relation
    meta["scenes"] = [s.to_json(size) for s in scenes]
    if edit is not None:
        meta["edit"] = asdict(edit)
    return Sample(f"shapes{index:010d}", caption, [render(s, size=size) for s in scenes], meta)


def _write_shard(task: tuple[int, int, int], *, out_dir: str, prefix: str, **settings) -> None:
    """Write shard `task` = (index, first sample, end sample); `settings` go to make_sample."""
    shard, start, stop = task
    with ShardWriter(out_dir, prefix=prefix, max_count=stop - start, start_index=shard) as writer:
        for i in range(start, stop):
            writer.write(make_sample(i, **settings))


MANIFEST = "synth-shapes.json"  # in the output directory: what its shards were made with


def _reusable(out_dir: Path, manifest: dict, tasks: list[tuple]) -> set[int]:
    """Shards of an earlier run into `out_dir` that this one may keep: same manifest (n aside), file
    present (shards are published by rename, so a present one is complete) and the same sample range.
    Any other setting, or a smaller n, is an error, never a silent mix."""
    path = out_dir / MANIFEST
    if not path.exists():
        return set()
    try:
        old = json.loads(path.read_text())
        old_n = int(old["n"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e}); remove it to start over") from None
    for key, value in manifest.items():
        if key != "n" and old.get(key) != value:
            raise ValueError(
                f"{out_dir} holds shards made with {key}={old.get(key)!r}, this run has {key}={value!r}; "
                "use another directory"
            )
    if manifest["n"] < old_n:
        raise ValueError(
            f"{out_dir} holds {old_n} samples, this run asks for n={manifest['n']}: fewer would leave shards "
            "beyond it in place; use another directory"
        )
    keep = set()
    for shard, start, stop in tasks:
        done = min(old_n, start + manifest["shard_size"]) == stop  # the earlier run wrote this whole range
        if done and shard_path(out_dir, manifest["prefix"], shard).exists():
            keep.add(shard)
    return keep


def write_synthetic(
    out_dir: str | Path,
    *,
    n: int,
    seed: int,
    workers: int = 1,
    size: int = 128,
    shard_size: int = 1000,
    prefix: str = "shapes",
    p_no_color: float = P_NO_COLOR,
    p_group_relation: float = P_GROUP_RELATION,
    progress: bool = False,
) -> list[Path]:
    """Write samples 0..n-1 of stream `seed` as `out_dir/{prefix}-{k:06d}.tar`, one process per shard
    across `workers`; shard k holds samples [k*shard_size, (k+1)*shard_size). Returns the paths in order.

    Resumable: `out_dir/synth-shapes.json` records the settings, and a rerun with the same ones keeps the
    shards already written (an interrupted run loses at most the shards in flight); a larger `n` extends."""
    for name, value in (("n", n), ("workers", workers), ("size", size), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("p_no_color", p_no_color), ("p_group_relation", p_group_relation)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    out_dir = Path(out_dir)
    tasks = [(k, start, min(n, start + shard_size)) for k, start in enumerate(range(0, n, shard_size))]
    settings = {"seed": seed, "size": size, "p_no_color": p_no_color, "p_group_relation": p_group_relation}
    manifest = {"n": n, "shard_size": shard_size, "prefix": prefix, **settings}
    keep = _reusable(out_dir, manifest, tasks)
    write = functools.partial(_write_shard, out_dir=str(out_dir), prefix=prefix, **settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{prefix}-*.tar.tmp*"):  # left by an interrupted run
        stale.unlink()
    todo = [t for t in tasks if t[0] not in keep]
    for task in todo:  # e.g. the short last shard of a smaller n: every shard on disk must fit the manifest
        shard_path(out_dir, prefix, task[0]).unlink(missing_ok=True)
    write_json(out_dir / MANIFEST, manifest)
    if keep:
        log.info("%s: keeping %d of %d shards from an earlier run", out_dir, len(keep), len(tasks))
    bar = tqdm(total=n, initial=n - sum(t[2] - t[1] for t in todo), unit="sample", disable=not progress)
    if workers == 1 or len(todo) < 2:
        for task in todo:
            write(task)
            bar.update(task[2] - task[1])
    else:
        # spawn: safe even when the parent already runs threads (torch), and the same on every OS.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for task, _ in zip(todo, pool.imap(write, todo), strict=True):
                bar.update(task[2] - task[1])
    bar.close()
    return [shard_path(out_dir, prefix, t[0]) for t in tasks]


def main(argv: list[str] | None = None) -> int:
    """`nextstep data synth-shapes OUT --n N --seed S [--workers W --size 128 --shard-size 1000 --p-no-color P
    --p-group-relation P]`."""
    p = ArgumentParser(prog="nextstep data synth-shapes", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output directory for the tar shards")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="stream seed; sample i depends only on (seed, i)")
    p.add_argument("--workers", type=int, default=1, help="processes, one shard at a time each")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="shapes", help="shard file name prefix")
    p.add_argument(
        "--p-no-color",
        type=float,
        default=P_NO_COLOR,
        help=f"share of scene captions that name shapes only, no colors (default {P_NO_COLOR})",
    )
    p.add_argument(
        "--p-group-relation",
        type=float,
        default=P_GROUP_RELATION,
        help="share of relation captions with a counted group on one side, e.g. 'two red circles above a blue "
        f"star' (default {P_GROUP_RELATION})",
    )
    args = p.parse_args(argv)
    try:
        paths = write_synthetic(
            args.out,
            n=args.n,
            seed=args.seed,
            workers=args.workers,
            size=args.size,
            shard_size=args.shard_size,
            prefix=args.prefix,
            p_no_color=args.p_no_color,
            p_group_relation=args.p_group_relation,
            progress=True,
        )
    except ValueError as e:
        p.error(str(e))
    log.info("wrote %d samples in %d shards to %s", args.n, len(paths), args.out)
    return 0
