"""The tokenizer of a model directory: its tokenizer.json (Hugging Face `tokenizers`), or bytes for byte-level
moekit models (vocabulary 256)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from moekit.train.tokenizer import ByteTokenizer


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception types for malformed files
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

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
    """Turns token ids into text as they come: decodes the whole continuation each time and emits what is new,
    holding back while the tail is an incomplete character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted) :], text
        return new
