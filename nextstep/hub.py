"""Model names: a local directory, a Hugging Face id (`owner/name[@revision]`) or a zoo name, resolved to a
checkpoint directory through the huggingface_hub cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN).

    nextstep models
    nextstep download nextstep-1.1 [DIR]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nextstep.args import ArgumentParser

VAE_REPO = "stepfun-ai/NextStep-1-f8ch16-Tokenizer"  # the release VAE, for checkpoints that ship without vae/
NEXTSTEP_MODEL_TYPES = ("nextstep", "stepx_llama")  # config.json model_type of the two families (model/config.py)
BUILTIN = "shapes"  # zoo name of the model shipped inside the package
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name; "./x", "/x" and "a/b/c" are paths


@dataclass(frozen=True)
class ZooModel:
    repo_id: str  # Hugging Face id
    family: str  # NextStep-1.1 | NextStep-1
    stage: str  # where in the release's training recipe it comes from
    use: str  # what it is for, as the release describes it

    @property
    def name(self) -> str:
        """The short name: the id's model part in lower case (`nextstep-1.1`)."""
        return self.repo_id.split("/")[1].lower()


# The official release (its download_models.sh): it recommends the 1.1 models; the 1-Large ones are older.
ZOO = (
    ZooModel("stepfun-ai/NextStep-1.1", "NextStep-1.1", "post-train (RL)", "text-to-image; recommended"),
    ZooModel("stepfun-ai/NextStep-1.1-Pretrain", "NextStep-1.1", "pretrain 512px", "text-to-image base before RL"),
    ZooModel("stepfun-ai/NextStep-1.1-Pretrain-256px", "NextStep-1.1", "pretrain 256px", "the one to fine-tune"),
    ZooModel("stepfun-ai/NextStep-1-Large", "NextStep-1", "annealed 512px", "text-to-image; older, not recommended"),
    ZooModel("stepfun-ai/NextStep-1-Large-Edit", "NextStep-1", "edit fine-tune", "image editing; older"),
    ZooModel("stepfun-ai/NextStep-1-Large-Pretrain", "NextStep-1", "pretrain", "older base, not recommended"),
)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None  # branch, tag or commit; None: main

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str) -> HubRef | None:
    """A zoo name or a Hugging Face id, each with an optional `@revision`; None when `text` is neither."""
    name, at, revision = text.partition("@")
    zoo = {m.name: m.repo_id for m in ZOO}
    repo_id = zoo.get(name.lower()) or (name if REPO_ID.fullmatch(name) else None)
    if repo_id is None:
        return None
    if at and not revision:
        raise ValueError(f"empty revision after '@' in model {text!r}")
    return HubRef(repo_id, revision or None)


def builtin_dir() -> Path:
    from nextstep.assets import builtin_model_dir

    path = builtin_model_dir()
    if path is None:
        raise ValueError("no built-in model is installed: pass --model a directory, a Hugging Face id or a zoo name")
    return path


def resolve_model_dir(model: str | Path | None) -> Path:
    """A checkpoint directory for `model`: None or "shapes" is the built-in model; an existing directory is
    used as is; a Hugging Face id or zoo name is fetched into (or read from) the huggingface_hub cache."""
    if model is None:
        return builtin_dir()
    text = str(model)
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser()
    if text.lower() == BUILTIN:
        return builtin_dir()
    ref = parse_hub_ref(text)
    if ref is None:
        raise FileNotFoundError(
            f"model directory not found: {text} (nor is it a Hugging Face id owner/name or a zoo name: "
            "`nextstep models` lists them)"
        )
    return fetch(ref)


def model_name(model: str | Path | None) -> str:
    """The name a model is served and reported under: a directory's own name, the model part of a Hugging
    Face id or zoo name (`NextStep-1.1`, not the cache's commit hash), `nextstep-shapes` for the built-in one."""
    if model is None or str(model).lower() == BUILTIN:
        return builtin_dir().name
    text = str(model)
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser().resolve().name
    ref = parse_hub_ref(text)
    return text if ref is None else ref.repo_id.split("/")[1]


def checkpoint_patterns() -> list[str]:
    """The files of a checkpoint directory (model/checkpoint.py's format); nothing else is downloaded."""
    from nextstep.model.checkpoint import INDEX_NAME, TOKENIZER_FILES
    from nextstep.sampling.pipeline import DEFAULTS_FILE

    return ["config.json", "*.safetensors", INDEX_NAME, *TOKENIZER_FILES, "vae/*", DEFAULTS_FILE]


def needs_vae(snapshot: Path) -> bool:
    """A NextStep checkpoint without its own vae/ (the release VAE goes with it)."""
    config = snapshot / "config.json"
    if (snapshot / "vae" / "config.json").is_file() or not config.is_file():
        return False
    return json.loads(config.read_text()).get("model_type") in NEXTSTEP_MODEL_TYPES


@contextlib.contextmanager
def hub_errors(ref: HubRef) -> Iterator[None]:
    """huggingface_hub's errors as one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"{ref} is not (completely) in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}: "
            f"download it first with network access: nextstep download {ref}"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"{ref.repo_id} has no revision {ref.revision!r}") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{ref.repo_id} is not a local directory, nor a Hugging Face model this account can read "
            "(gated or private: log in with `hf auth login` or set HF_TOKEN)"
        ) from None


def snapshots(
    ref: HubRef, *, local_dir: Path | None = None, local_files_only: bool = False
) -> tuple[Path, Path | None]:
    """The checkpoint's snapshot directory and, when it has no vae/, the release VAE's (in the cache, or
    local_dir/vae). Downloads what is missing (resuming partial files) unless offline or local_files_only."""
    from huggingface_hub import snapshot_download

    with hub_errors(ref):
        model = Path(
            snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                allow_patterns=checkpoint_patterns(),
                local_dir=local_dir,
                local_files_only=local_files_only,
            )
        )
        if not needs_vae(model):
            return model, None
        from nextstep.model.checkpoint import VAE_FILES

        vae = snapshot_download(
            VAE_REPO,
            allow_patterns=list(VAE_FILES),
            local_dir=None if local_dir is None else local_dir / "vae",
            local_files_only=local_files_only,
        )
    return model, Path(vae)


def fetch(ref: HubRef) -> Path:
    """A checkpoint directory for `ref` from the huggingface_hub cache, downloading what is missing."""
    model, vae = snapshots(ref)
    return model if vae is None else with_vae(model, vae)


def with_vae(snapshot: Path, vae: Path) -> Path:
    """A directory of links, `$HF_HOME/nextstep/<repo>/<commit>`: every file of `snapshot` plus vae/ -> `vae`,
    the layout check_model_dir and load_vae read. Rebuilt when stale; safe when several ranks race."""
    from huggingface_hub import constants

    out = Path(constants.HF_HOME) / "nextstep" / snapshot.parent.parent.name / snapshot.name
    entries = [p for p in snapshot.iterdir() if p.name != "vae"]

    def linked(d: Path) -> bool:
        return (d / "vae").resolve() == vae.resolve() and all((d / p.name).exists() for p in entries)

    if linked(out):
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in entries:
        (tmp / p.name).symlink_to(p.absolute())
    (tmp / "vae").symlink_to(vae.absolute(), target_is_directory=True)
    if not linked(out):  # another rank may have made it meanwhile: keep theirs
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):
            tmp.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_cached(ref: HubRef) -> bool:
    """Whether `ref` (and the VAE it needs) can be loaded without the network."""
    try:
        snapshots(ref, local_files_only=True)
    except FileNotFoundError:
        return False
    return True


def format_zoo() -> str:
    rows = [("name", "Hugging Face id", "family", "stage", "cached", "use")]
    rows.append((BUILTIN, "(built in)", "NextStep-1.1", "toy shapes world", "yes", "offline smoke tests, the default"))
    for m in ZOO:
        rows.append((m.name, m.repo_id, m.family, m.stage, "yes" if is_cached(HubRef(m.repo_id)) else "no", m.use))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    return "\n".join(lines) + f"\n\nVAE of checkpoints without vae/: {VAE_REPO} (fetched with them)."


def main_models(argv: list[str]) -> int:
    """`nextstep models`: the zoo, marking what is already in the local cache."""
    ArgumentParser(prog="nextstep models", description="list the model zoo").parse_args(argv)
    print(format_zoo())
    return 0


def main_download(argv: list[str]) -> int:
    """`nextstep download NAME [DIR]`: fetch a checkpoint (and its VAE) into the cache, or into DIR as plain files;
    run again to resume an interrupted download. Prints the checkpoint directory."""
    p = ArgumentParser(prog="nextstep download", description=main_download.__doc__.split(";")[0])
    p.add_argument("name", help="zoo name or Hugging Face id, optionally @revision (`nextstep models` lists them)")
    p.add_argument("dir", nargs="?", type=Path, default=None, help="write a plain checkpoint directory here")
    args = p.parse_args(argv)
    if args.name.lower() == BUILTIN:
        print(builtin_dir())
        return 0
    ref = parse_hub_ref(args.name)
    if ref is None:
        raise ValueError(f"{args.name!r} is not a zoo name or a Hugging Face id owner/name (see `nextstep models`)")
    print(snapshots(ref, local_dir=args.dir)[0] if args.dir is not None else fetch(ref))
    return 0
