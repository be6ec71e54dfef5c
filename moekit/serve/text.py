"""From a choice's token ids to the text a client sees: incremental detokenization and stop strings (cut from
the output; while the text's tail could still begin a stop string it is held back from a stream)."""

from __future__ import annotations

from moekit.infer.tokenizers import StreamDecoder, Tokenizer


class ChoiceText:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far (up to a stop string, once one is met)
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text now safe to send (nothing once a stop string was met)."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += self.decoder.push(token)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        hold = _held_back(self.text, self.stop)
        out = self.text[self.sent : len(self.text) - hold]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        """The rest of the text (at the end of a choice)."""
        if not self.stopped:
            self.text += self.decoder.flush()
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could be the start of a stop string."""
    for n in range(min(len(text), max((len(s) - 1 for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0
