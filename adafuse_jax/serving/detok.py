"""Incremental detokenization with stop strings, for streaming."""

from __future__ import annotations

from typing import Sequence

from adafuse_jax.weights.tokenizer import Tokenizer


class IncrementalText:
  """Turns a growing list of token ids into text deltas, holding back what is not final yet.

  Decoding only a short window of ids per token (the vLLM scheme: the text of
  `ids[prefix:read]` against `ids[prefix:]`) keeps a step's cost independent of the length
  generated. Held back: an unfinished multi-byte character, and the last characters that could
  still be the start of a stop string.
  """

  def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
    self.tok = tokenizer
    self.stop = tuple(s for s in stop if s)
    self.hold = max((len(s) for s in self.stop), default=1) - 1
    self.ids: list[int] = []
    self.text = ""  # all text decoded so far (final up to `emitted`)
    self.emitted = 0
    self._prefix = 0
    self._read = 0
    self.stopped = False

  def add(self, token: int) -> str:
    """Appends a token; returns the text that became final (maybe ""). After a stop string
    was found, `stopped` is True and the text ends before it."""
    if self.stopped:  # the text ended at a stop string: later tokens add nothing
      return ""
    self.ids.append(token)
    prefix = self.tok.decode(self.ids[self._prefix:self._read])
    full = self.tok.decode(self.ids[self._prefix:])
    if full.endswith("\ufffd") or len(full) <= len(prefix):
      return ""
    self.text += full[len(prefix):]
    self._prefix, self._read = self._read, len(self.ids)
    if self.stop:
      lo = max(0, self.emitted - self.hold)
      hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
      if hits:
        self.text = self.text[:min(hits)]
        self.stopped = True
        return self.flush()
    end = len(self.text) - self.hold
    if end <= self.emitted:
      return ""
    out = self.text[self.emitted:end]
    self.emitted = end
    return out

  def flush(self) -> str:
    """The text held back (at the end of a sequence)."""
    out = self.text[self.emitted:]
    self.emitted = len(self.text)
    return out
