"""What a checkpoint says it was trained for (the "trained" entry of its sampling_defaults.json: image sizes, and
the language of its edit instructions), and one warning line when a request leaves it: a small model trained
on one domain gives noise outside it, and should say so rather than fail silently."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

INSTRUCTION_LANGUAGES = ("shapes",)  # nextstep.shapes: the caption and edit templates of the synthetic shapes data


@dataclass
class Trained:
    sizes: list[tuple[int, int]] | None = None  # (H, W) in pixels the model was trained at; None: not recorded
    edit_instructions: str | None = None  # one of INSTRUCTION_LANGUAGES; None: any text
    prompts: str | None = None  # the vocabulary of its text prompts, one of INSTRUCTION_LANGUAGES; None: any


def read_trained(raw: dict, where: str) -> Trained:
    """The "trained" entry of a sampling_defaults.json; ValueError naming `where` if malformed."""
    unknown = set(raw) - {"sizes", "edit_instructions", "prompts"}
    sizes = raw.get("sizes")
    language = raw.get("edit_instructions")
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in 'trained' of {where}")
    if sizes is not None and not all(isinstance(s, list) and len(s) == 2 for s in sizes):
        raise ValueError(f"'trained.sizes' of {where} must be a list of [height, width], got {sizes!r}")
    for key in ("edit_instructions", "prompts"):
        if raw.get(key) not in (None, *INSTRUCTION_LANGUAGES):
            raise ValueError(f"'trained.{key}' of {where} must be one of {INSTRUCTION_LANGUAGES}")
    return Trained(None if sizes is None else [tuple(s) for s in sizes], language, raw.get("prompts"))


def warn_untrained_size(trained: Trained, size: tuple[int, int]) -> None:
    if trained.sizes and tuple(size) not in trained.sizes:
        shown = ", ".join(f"{w}x{h}" for h, w in trained.sizes)
        log.warning(
            "warning: this model was trained at %s only; at %dx%d expect noise rather than an image",
            shown,
            size[1],
            size[0],
        )


def warn_unknown_instructions(trained: Trained, instructions: list[str]) -> None:
    if trained.edit_instructions == "shapes":
        from nextstep.shapes.prompts import parse_edit

        for text in instructions:
            try:
                parse_edit(text)
            except ValueError as e:
                log.warning("warning: %s; editing anyway", e)


def warn_unknown_words(trained: Trained, prompts: list[str]) -> None:
    """One line per prompt naming the words a model with a closed vocabulary (the built-in one) never saw,
    instead of drawing something else without a word."""
    if trained.prompts == "shapes":
        from nextstep.shapes.phrasing import vocabulary_warning

        for text in prompts:
            warning = vocabulary_warning(text)
            if warning:
                log.warning("warning: %s", warning)
