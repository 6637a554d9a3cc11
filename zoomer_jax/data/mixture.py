"""Exemplar and reflection SFT records mixed at a stated ratio, as one random-access source.

    source = MixedSource(exemplars, reflections, ratio=0.25, seed=0)   # len(source) = n_e + m

Every exemplar appears once; `m = round(n_e * ratio / (1 - ratio))` slots hold reflection records, so
reflections are `ratio` of the source (up to rounding one record). The slots are spread evenly (slot i is a
reflection when floor((i + 1) m / N) > floor(i m / N)), so any run of positions holds its share too; they take
the reflection records in an order drawn with `seed`, cycling when m exceeds their number (each then repeats at
most once more than any other) and leaving the last ones out when it is smaller. The training stream shuffles the
positions each epoch (`data.pipeline.make_stream`), so every epoch still holds exactly m reflections.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def reflection_slots(n_exemplars: int, ratio: float) -> int:
  """m: the reflection slots that make them `ratio` of the mixture."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"data.reflection_ratio must be in [0, 1), got {ratio}")
  return int(round(n_exemplars * ratio / (1.0 - ratio)))


class MixedSource:
  """`len(src)`, `src[i]`: exemplar or reflection record (whatever the two sources hold)."""

  def __init__(self, exemplars: Sequence, reflections: Sequence, ratio: float, seed: int = 0):
    if not len(exemplars):
      raise ValueError("the mixture has no exemplar records")
    self.m = reflection_slots(len(exemplars), ratio)
    if self.m and not len(reflections):
      raise ValueError(f"data.reflection_ratio {ratio} asks for reflection records but there are none")
    self._ex, self._re = exemplars, reflections
    self._n = len(exemplars) + self.m
    self._order = np.random.default_rng(seed).permutation(len(reflections)) if len(reflections) else None

  def __len__(self) -> int:
    return self._n

  def _reflections_before(self, i: int) -> int:
    return (i * self.m) // self._n

  def is_reflection(self, i: int) -> bool:
    return self._reflections_before(i + 1) > self._reflections_before(i)

  def __getitem__(self, i: int):
    i = int(i)
    if not 0 <= i < self._n:
      raise IndexError(f"position {i} is outside the mixture's {self._n} records")
    before = self._reflections_before(i)
    if self.is_reflection(i):
      return self._re[int(self._order[before % len(self._re)])]
    return self._ex[i - before]

  def __repr__(self) -> str:
    return f"MixedSource({len(self._ex)} exemplars + {self.m} reflection slots of {len(self._re)} records)"
