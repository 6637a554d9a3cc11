"""Streaming a trajectory's assistant text as the engine samples it (`serve`, `infer`).

    stream = TurnStream(tok)
    on "tokens" events: send(stream.add(ids)); on "turn" events: send(stream.end(turn_text))
"""

from __future__ import annotations


class TurnStream:
  """One request's streamed content: the text of each engine step's new tokens, as deltas. A turn's text is its
  ids decoded whole (special tokens skipped, as `Transcript.turn_text`); a delta holds back a trailing partial
  UTF-8 character (decoded as U+FFFD) until its next byte arrives, so the deltas concatenate to the turns joined
  by "\n" (the response's content). Were a decoder ever to print a prefix of ids as no prefix of the whole, the
  rest of that turn is not streamed (the final chunk's `zoomer.turns` still holds every turn)."""

  def __init__(self, tok):
    self.tok, self.turns = tok, 0
    self._new_turn()

  def _new_turn(self):
    self.ids, self.sent, self.opened, self.broken = [], "", False, False

  def add(self, ids) -> str:
    self.ids += ids
    return self._delta(self.tok.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd"))

  def end(self, turn_text: str) -> str:
    """The rest of a finished turn, given its final text; the next tokens start a new turn."""
    delta = self._delta(turn_text)
    self.turns += 1
    self._new_turn()
    return delta

  def _delta(self, text: str) -> str:
    if self.broken or not text.startswith(self.sent):
      self.broken = True
      return ""
    delta, self.sent = text[len(self.sent):], text
    if not self.opened:  # a turn after the first starts with the separator, even if it is empty
      self.opened = True
      delta = ("\n" if self.turns else "") + delta
    return delta
