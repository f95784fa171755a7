"""Train a small byte-level BPE text tokenizer for a new domain, with NextStep's special tokens.

    python -m nextstep.train.tokenizer data/shapes runs/tokenizer --vocab-size 1024

Pre-tokenisation follows Qwen2 (digits one per token, byte-level); the special tokens are appended
after the BPE vocabulary in the official order, so ids look like the release's (eos, pad, ..., image_area,
boi, eoi, placeholder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from nextstep.args import ArgumentParser
from nextstep.io import write_json
from nextstep.model.tokenizer import BOI, EOI, EOS, IMAGE_AREA, IMAGE_PLACEHOLDER, PAD

SPECIAL_TOKENS = [
    EOS,
    PAD,
    "<|im_start|>",
    "<|im_end|>",
    IMAGE_AREA,
    BOI,
    EOI,
    IMAGE_PLACEHOLDER,
    "<|begin_of_prompt_refinement|>",
    "<|end_of_prompt_refinement|>",
    "<|begin_of_thinking|>",
    "<|end_of_thinking|>",
]
# Qwen2's split pattern.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024) -> Path:
    """Fit BPE on `texts` and write tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tokenizer.json", json.loads(tok.to_str()))
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": 4096,
            "add_prefix_space": False,
        },
    )
    write_json(out / "special_tokens_map.json", {"eos_token": EOS, "pad_token": PAD})
    return out


def shard_captions(root: str | Path) -> Iterator[str]:
    """Caption text (placeholders removed) of every sample in the shards under `root`."""
    from nextstep.data.format import read_shard

    for shard in sorted(Path(root).rglob("*.tar")):
        for sample in read_shard(shard):
            yield re.sub(r"<image_\d+>", " ", sample.caption)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="nextstep data train-tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="folder of WebDataset shards whose captions to learn from")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--vocab-size", type=int, default=1024, help="size including the special tokens")
    parser.add_argument("--max-samples", type=int, default=200_000, help="captions to read at most")
    args = parser.parse_args(argv)
    if args.vocab_size <= len(SPECIAL_TOKENS) + 256:
        parser.error(f"--vocab-size must exceed {len(SPECIAL_TOKENS) + 256}, got {args.vocab_size}")
    captions = (c for i, c in enumerate(shard_captions(args.shards)) if i < args.max_samples)
    out = train_tokenizer(captions, args.out, vocab_size=args.vocab_size)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
