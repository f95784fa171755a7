"""Text tokenizer: the checkpoint's tokenizer.json read with the `tokenizers` library.

Special-token strings live here (one place); their ids come from the tokenizer file.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

IMAGE_AREA = "<|image_area|>"
BOI = "<|begin_of_image|>"
EOI = "<|end_of_image|>"
IMAGE_PLACEHOLDER = "<|image_placeholder|>"
PAD = "[PAD]"
EOS = "<|endoftext|>"


class TextTokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        self.path = file
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception for any unreadable file
            raise ValueError(f"cannot read tokenizer {file}: {e}") from None

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no BOS/EOS added (Qwen2 has no BOS)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}")
        return idx

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
