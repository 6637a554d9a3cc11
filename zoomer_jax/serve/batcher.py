"""The request queue of `serve` and the scheduler thread that runs it.

    batcher = Batcher(runner.run, max_batch=16, max_queue=64, wait_s=0.005)
    batcher.submit(req)        # ApiError 429 when the queue is full, 503 once closing
    batcher.close()            # refuses what waits (503), lets the running requests finish, joins the thread

The scheduler takes the oldest waiting request and every other waiting one with the same `batch_key` (mode and
sampling parameters), up to `max_batch`, after waiting `wait_s` so that requests arriving together start
together, and calls `run(batch, more)`. `more(n)` hands the run up to n more waiting requests of its key while it
runs (the agent's engine polls it between steps: per-step admission), as long as the oldest waiting request has
that key, so that a stream of one key cannot starve another. A run that raises fails its own requests (500),
never the server.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from typing import Callable

from zoomer_jax.serve.api import ApiError, Request


class Batcher:
  def __init__(self, run: Callable[[list[Request], Callable], None], max_batch: int, max_queue: int, wait_s: float):
    if max_batch < 1 or max_queue < 0 or wait_s < 0:
      raise ValueError(f"need max_batch >= 1, max_queue >= 0, wait_s >= 0; got {max_batch}, {max_queue}, {wait_s}")
    self.run, self.max_batch, self.max_queue, self.wait_s = run, max_batch, max_queue, wait_s
    self._cv = threading.Condition()
    self._queue: collections.deque[Request] = collections.deque()
    self._closing = False
    self.running = 0  # requests in the batch being run
    # batches: runs started; requests: taken, `joined` of them while a run was going; largest_batch: the most
    # requests one run served
    self.stats = dict(batches=0, requests=0, joined=0, largest_batch=0, rejected_full=0, failed_batches=0,
                      busy_s=0.0)
    self._thread = threading.Thread(target=self._loop, name="serve-scheduler", daemon=True)
    self._thread.start()

  @property
  def queued(self) -> int:
    return len(self._queue)

  def submit(self, req: Request) -> None:
    with self._cv:
      if self._closing:
        raise ApiError(503, "the server is shutting down", "shutting_down")
      if len(self._queue) >= self.max_queue:
        self.stats["rejected_full"] += 1
        raise ApiError(429, f"the queue is full ({len(self._queue)} requests wait); retry later", "queue_full",
                       type_="rate_limit_error")
      self._queue.append(req)
      self._cv.notify()

  def _take(self) -> list[Request] | None:
    with self._cv:
      while not self._queue and not self._closing:
        self._cv.wait()
      if not self._queue:
        return None
    if self.wait_s:
      time.sleep(self.wait_s)  # let requests that arrive together share the batch
    with self._cv:
      if not self._queue:  # close() refused them meanwhile
        return None
      key = self._queue[0].batch_key
      batch = [r for r in self._queue if r.batch_key == key][:self.max_batch]
      taken = {id(r) for r in batch}
      self._queue = collections.deque(r for r in self._queue if id(r) not in taken)
      self.running = len(batch)
    return batch

  def _more(self, key: tuple, batch: list[Request]) -> Callable[[int], list[Request]]:
    def more(n: int) -> list[Request]:
      with self._cv:
        if self._closing or n <= 0 or not self._queue or self._queue[0].batch_key != key:
          return []
        taken = [r for r in self._queue if r.batch_key == key][:n]
        ids = {id(r) for r in taken}
        self._queue = collections.deque(r for r in self._queue if id(r) not in ids)
        batch.extend(taken)
        self.running = len(batch)
        self.stats["requests"] += len(taken)
        self.stats["joined"] += len(taken)
      return taken
    return more

  def _loop(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        if self._closing:
          return
        continue
      self.stats["batches"] += 1
      self.stats["requests"] += len(batch)
      t0 = time.perf_counter()
      try:
        self.run(batch, self._more(batch[0].batch_key, batch))
      except Exception as e:  # noqa: BLE001 (a batch's failure is its requests' 500, not the server's end)
        self.stats["failed_batches"] += 1
        where = traceback.extract_tb(e.__traceback__)[-1]
        err = ApiError(500, f"the batch failed: {type(e).__name__}: {e} (at {where.filename}:{where.lineno})",
                       "internal_error")
        for r in batch:  # those that joined included; one already answered never reads a second event
          r.events.put(("error", err))
      finally:
        self.stats["busy_s"] += time.perf_counter() - t0  # seconds spent running batches
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        with self._cv:
          self.running = 0

  def close(self, timeout: float | None = None) -> None:
    """Refuses the waiting requests (503), lets the running batch finish and stops the thread."""
    with self._cv:
      self._closing = True
      waiting, self._queue = list(self._queue), collections.deque()
      self._cv.notify_all()
    for r in waiting:
      r.events.put(("error", ApiError(503, "the server is shutting down", "shutting_down")))
    self._thread.join(timeout)
