"""The tokenizer of a model directory: its tokenizer.json (Hugging Face `tokenizers`), or bytes for byte-level
moekit models (vocabulary 256)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from moekit.train.tokenizer import ByteTokenizer


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception types for malformed files
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens=False for text that holds them already (a rendered chat template)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(directory: str | Path, vocab_size: int) -> Tokenizer:
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path)
    if vocab_size == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise ValueError(f"{directory}: no tokenizer.json, and a {vocab_size}-token vocabulary is not byte-level")


class StreamDecoder:
    """Turns token ids into text as they come, holding back while the tail is an incomplete character. Decodes a
    short window (from a few tokens back) each time, as text-generation servers do, so a long continuation costs
    O(1) per token: a token's text can depend on the tokens just before it (byte pieces, word-boundary spaces)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix, self.read = 0, 0  # the window starts at ids[prefix]; ids[:read] are already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        seen, text = self._window()
        if text.endswith("\ufffd") or len(text) <= len(seen):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen) :]

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end of a continuation), as the decoder gives it."""
        seen, text = self._window()
        self.prefix = self.read = len(self.ids)
        return text[len(seen) :]

    def _window(self) -> tuple[str, str]:
        """The window's text already emitted, and all of it."""
        return self.tokenizer.decode(self.ids[self.prefix : self.read]), self.tokenizer.decode(self.ids[self.prefix :])
