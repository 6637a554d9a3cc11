"""Streaming a trajectory's assistant text as the engine samples it (`serve`, `infer`).

    stream = TurnStream(tok)
    on "tokens" events: send(stream.add(ids)); on "turn" events: send(stream.end(turn_text))
"""

from __future__ import annotations


class TurnStream:
  """One request's streamed content: the text of each engine step's new tokens, as deltas. A turn's text is its
  ids decoded whole (special tokens skipped, as `Transcript.turn_text`); a delta holds back a trailing partial
  UTF-8 character (decoded as U+FFFD) until its next byte arrives, so the deltas concatenate to the turns joined
  by "\n" (the response's content). Only the ids since the text last ended on a whole character are decoded
  again at a step, so a turn streams in linear time. Were a decoder ever to print a prefix of ids as no prefix
  of the whole, the rest of that turn is not streamed (the final chunk's `zoomer.turns` still holds every
  turn)."""

  def __init__(self, tok):
    self.tok, self.turns = tok, 0
    self._new_turn()

  def _new_turn(self):
    self.parts, self.opened, self.broken = [], False, False  # parts: the turn's text sent so far
    self.tail, self.tail_sent = [], ""  # ids not yet known to end on a character boundary; their text sent

  def add(self, ids) -> str:
    self.tail += ids
    text = self.tok.decode(self.tail, skip_special_tokens=True)
    whole = not text.endswith("\ufffd")  # else a character may be incomplete: these ids are decoded again
    delta = self._delta(self.tail_sent, text if whole else text.rstrip("\ufffd"))
    self.tail, self.tail_sent = ([], "") if whole else (self.tail, self.tail_sent + delta)
    return self._open(delta)

  def end(self, turn_text: str) -> str:
    """The rest of a finished turn, given its final text; the next tokens start a new turn."""
    delta = self._open(self._delta("".join(self.parts), turn_text))
    self.turns += 1
    self._new_turn()
    return delta

  def _delta(self, sent: str, text: str) -> str:
    if self.broken or not text.startswith(sent):
      self.broken = True
      return ""
    delta = text[len(sent):]
    self.parts.append(delta)
    return delta

  def _open(self, delta: str) -> str:
    if not self.opened and not self.broken:  # a turn after the first starts with the separator, even if empty
      self.opened = True
      delta = ("\n" if self.turns else "") + delta
    return delta
