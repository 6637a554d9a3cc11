"""Host-side bookkeeping of the paged KV cache: which pool pages each sequence owns (`model/paged.py` holds the
pages themselves).

    alloc = PageAllocator(num_pages=64, page_size=16, pages_per_seq=8)
    alloc.new("prompt"); alloc.append("prompt", 21)         # pages for 21 tokens
    alloc.fork("prompt", "s0"); alloc.fork("prompt", "s1")  # n samples point at the prompt's pages
    alloc.free("prompt")
    alloc.append("s0", 32); alloc.truncate("s0", 24)        # room for 32 more, 3 of them written: the rest back
    batch = alloc.step([("s0", 3), ("s1", 1)], max_seqs=8, max_tokens=16)   # a RaggedBatch for the device

A page is shared by reference count. Full pages are never written again, so sharing them is free; the last,
partly filled page of a forked sequence is copied on write: the first append to it moves the sequence to a fresh
page, and the step's `RaggedBatch` names the copy (`copy_src -> copy_dst`) for the device to make before writing.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from zoomer_jax.model.paged import RaggedBatch


class PagePoolExhausted(RuntimeError):
  """The pool has fewer free pages than an append needs."""


class PageAllocator:
  """Free list and reference counts over `num_pages` pages of `page_size` tokens; sequences by any hashable id,
  each at most `pages_per_seq` pages (the width of the kernel's page table)."""

  def __init__(self, num_pages: int, page_size: int, pages_per_seq: int):
    if min(num_pages, page_size, pages_per_seq) <= 0:
      raise ValueError(f"num_pages ({num_pages}), page_size ({page_size}) and pages_per_seq ({pages_per_seq}) "
                       "must be positive")
    self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
    self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low pages first
    self._refs = np.zeros(num_pages, np.int32)
    self._pages: dict[Hashable, list[int]] = {}
    self._lengths: dict[Hashable, int] = {}

  # --- queries -----------------------------------------------------------------------------------------------
  @property
  def free_pages(self) -> int:
    return len(self._free)

  def pages(self, seq: Hashable) -> list[int]:
    return list(self._pages[self._known(seq)])

  def length(self, seq: Hashable) -> int:
    return self._lengths[self._known(seq)]

  def refcount(self, page: int) -> int:
    return int(self._refs[page])

  def __contains__(self, seq: Hashable) -> bool:
    return seq in self._pages

  def _known(self, seq):
    if seq not in self._pages:
      known = ", ".join(sorted(map(repr, self._pages))[:8]) + (", ..." if len(self._pages) > 8 else "")
      raise KeyError(f"unknown sequence {seq!r} (known: {known or 'none'})")
    return seq

  # --- changes -----------------------------------------------------------------------------------------------
  def new(self, seq: Hashable) -> None:
    """An empty sequence (no pages until its first append)."""
    if seq in self._pages:
      raise ValueError(f"sequence {seq!r} exists already")
    self._pages[seq], self._lengths[seq] = [], 0

  def fork(self, src: Hashable, dst: Hashable) -> None:
    """`dst` starts as `src`: the same pages (shared, reference counted) and length."""
    self._known(src)
    self.new(dst)
    self._pages[dst], self._lengths[dst] = list(self._pages[src]), self._lengths[src]
    for p in self._pages[dst]:
      self._refs[p] += 1

  def free(self, seq: Hashable) -> None:
    """Drops the sequence; its pages no other sequence holds return to the free list."""
    for p in reversed(self._pages.pop(self._known(seq))):
      self._refs[p] -= 1
      if self._refs[p] == 0:
        self._free.append(p)
    del self._lengths[seq]

  def _need(self, seq, n: int, refs: dict) -> tuple[int, bool]:
    """(pages to take from the free list, whether the last page is copied) for `n` more tokens; `refs` overrides
    reference counts (a step's earlier copies). Raises when the sequence would outgrow its page table."""
    if n < 0:
      raise ValueError(f"cannot append {n} tokens to sequence {seq!r}")
    pages, length, ps = self._pages[seq], self._lengths[seq], self.page_size
    total = -(-(length + n) // ps)
    if total > self.pages_per_seq:
      raise ValueError(f"sequence {seq!r} would hold {length + n} tokens, {total} pages; a sequence has at most "
                       f"pages_per_seq={self.pages_per_seq} ({self.pages_per_seq * ps} tokens)")
    cow = n > 0 and length % ps != 0 and refs.get(pages[-1], self._refs[pages[-1]]) > 1
    return total - len(pages) + int(cow), cow

  def append(self, seq: Hashable, n: int) -> tuple[int, int] | None:
    """Room for `n` more tokens of `seq` (its length grows by n). Returns the copy (src page, dst page) the device
    must make first when the partly filled last page was shared, else None. Nothing changes when it raises."""
    need, cow = self._need(self._known(seq), n, {})
    if need > len(self._free):
      raise PagePoolExhausted(f"page pool exhausted: sequence {seq!r} asked for {need} pages ({n} tokens after "
                              f"{self._lengths[seq]}), {len(self._free)} of {self.num_pages} free")
    pages = self._pages[seq]
    copy = None
    if cow:
      src, dst = pages[-1], self._free.pop()
      self._refs[src] -= 1
      self._refs[dst] = 1
      pages[-1] = dst
      copy = (src, dst)
    for _ in range(need - int(cow)):
      p = self._free.pop()
      self._refs[p] = 1
      pages.append(p)
    self._lengths[seq] += n
    return copy

  def truncate(self, seq: Hashable, length: int) -> None:
    """Shortens `seq` to its first `length` tokens: the pages past them are released (returned to the free list
    when no other sequence holds them). Gives back what `append` reserved and was not written (a decode burst
    reserves room for its most tokens)."""
    self._known(seq)
    if not 0 <= length <= self._lengths[seq]:
      raise ValueError(f"cannot truncate sequence {seq!r} of {self._lengths[seq]} tokens to {length}")
    pages = self._pages[seq]
    keep = -(-length // self.page_size)
    for p in reversed(pages[keep:]):
      self._refs[p] -= 1
      if self._refs[p] == 0:
        self._free.append(p)
    del pages[keep:]
    self._lengths[seq] = length

  def step(self, appends: Sequence[tuple[Hashable, int]], *, max_seqs: int, max_tokens: int) -> RaggedBatch:
    """Appends `n` tokens to each `(seq, n)` and describes the step for the device: the tokens of the listed
    sequences, in order, flattened into `max_tokens` rows and `max_seqs` sequences (fixed sizes, so that every
    step of a bucket runs one compiled program). Checks the sizes before appending anything."""
    seqs = [s for s, _ in appends]
    if len(set(seqs)) != len(seqs):
      raise ValueError(f"a sequence appears twice in one step: {seqs}")
    q_lens = [n for _, n in appends]
    if len(appends) > max_seqs or sum(q_lens) > max_tokens:
      raise ValueError(f"{len(appends)} sequences with {sum(q_lens)} tokens do not fit a step of max_seqs="
                       f"{max_seqs}, max_tokens={max_tokens}")
    if any(n < 1 for n in q_lens):
      raise ValueError(f"every sequence of a step adds at least one token: {list(appends)}")
    for s in seqs:
      self._known(s)
    self._check_step_fits(appends)
    copies = [self.append(s, n) for s, n in appends]
    return self._batch(seqs, q_lens, [c for c in copies if c], max_seqs)

  def pages_needed(self, appends: Sequence[tuple[Hashable, int]]) -> int:
    """Free pages that appending `n` tokens to each `(seq, n)`, in order, would take (copies on write included: a
    copy lowers the shared page's count, so a later sequence may write that page in place)."""
    refs, need = {}, 0
    for s, n in appends:
      k, cow = self._need(self._known(s), n, refs)
      if cow:
        last = self._pages[s][-1]
        refs[last] = refs.get(last, int(self._refs[last])) - 1
      need += k
    return need

  def _check_step_fits(self, appends) -> None:
    """Raises before any append when the step as a whole needs more pages than are free."""
    need = self.pages_needed(appends)
    if need > len(self._free):
      raise PagePoolExhausted(f"page pool exhausted: the step's {len(appends)} sequences asked for {need} pages, "
                              f"{len(self._free)} of {self.num_pages} free")

  def _batch(self, seqs, q_lens, copies, max_seqs) -> RaggedBatch:
    table = np.zeros((max_seqs, self.pages_per_seq), np.int32)  # unused entries name page 0, a valid page
    kv_lens = np.zeros(max_seqs, np.int32)
    for i, s in enumerate(seqs):
      table[i, :len(self._pages[s])] = self._pages[s]
      kv_lens[i] = self._lengths[s]
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    src = np.zeros(max_seqs, np.int32)
    dst = np.full(max_seqs, self.num_pages, np.int32)  # out of range: dropped by `copy_pages`
    for i, (a, b) in enumerate(copies):
      src[i], dst[i] = a, b
    return RaggedBatch(page_indices=table, kv_lens=kv_lens, cu_q_lens=cu,
                       num_seqs=np.array([len(seqs)], np.int32), copy_src=src, copy_dst=dst)


TOKENS_FINE = 128  # token rows: from 128 up, 3/4 of a power of two too (96, 192, 384, 768, ...: multiples of 32)
SEQS_FINE = 16  # sequences: 12, 24, 48, ...


def bucket(n: int, minimum: int = 8, fine_from: int = 0) -> int:
  """The power of two >= max(n, minimum): step sizes (tokens, sequences) a run compiles a handful of programs for.
  With `fine_from`, powers of two from it up also have a bucket at three quarters of them: two programs per
  octave, a third of padding at most where a power of two alone pads up to a half."""
  if n < 0:
    raise ValueError(f"cannot bucket a negative size {n}")
  b = max(minimum, 1 << max(0, n - 1).bit_length())
  if fine_from and b >= fine_from and 3 * b // 4 >= max(n, minimum):
    return 3 * b // 4
  return b


def token_bucket(n: int, minimum: int = 8) -> int:
  """A step's rows T for n tokens (`bucket` with three-quarter steps from TOKENS_FINE)."""
  return bucket(n, minimum, TOKENS_FINE)


def seq_bucket(n: int) -> int:
  """A step's sequences (and slots) S, or a burst's rows, for n (`bucket` with three-quarter steps from
  SEQS_FINE): a padding row costs a burst as much as a real one."""
  return bucket(n, 8, SEQS_FINE)
