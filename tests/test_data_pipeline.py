"""grain pipelines: seeded per-epoch shuffles, per-process shards, exact resume from a JSON state, collation, and the
global stream each training process reads only its rows of."""

import json
import sys

import numpy as np
import pytest

from zoomer_jax.data.pipeline import collate, make_iterator, make_stream
from zoomer_jax.data.records import RLRecord

# grain's index shuffle costs ~1 ms per element on 50 records but ~0.1 ms on a few hundred: keep N that size.
N = 257  # prime: not a multiple of any shard count or batch size below
SOURCE = list(range(N))
N_EVEN = 240  # a multiple of the batch sizes below, for states exactly on an epoch boundary


def take(it, k):
  return [next(it) for _ in range(k)]


def elements(it, k):
  """k items as plain ints (elements) or lists of ints (batches)."""
  return [x.tolist() if isinstance(x, np.ndarray) else x for x in take(it, k)]


def make(seed=0, n=N, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  return make_iterator(list(range(n)), seed=seed, **kw)


def test_same_seed_same_order_different_seed_different():
  a, b, c = elements(make(7), 3 * N), elements(make(7), 3 * N), elements(make(8), 3 * N)
  assert a == b
  assert a[:N] != c[:N]  # equal with probability 1/257!


def test_each_epoch_is_a_fresh_permutation():
  stream = elements(make(3), 4 * N)
  epochs = [stream[e * N:(e + 1) * N] for e in range(4)]
  for ep in epochs:
    assert sorted(ep) == SOURCE
  assert len({tuple(ep) for ep in epochs}) == 4
  assert epochs[0] != SOURCE


def test_seed_s_epoch_1_is_not_seed_s_plus_1_epoch_0():
  # Grain seeds epoch e with seed + e; we hash the user's seed so neighbouring seeds do not share epochs.
  assert elements(make(0), 2 * N)[N:] != elements(make(1), N)


def test_no_shuffle_and_finite_epochs():
  assert list(make(0, shuffle=False, num_epochs=2)) == SOURCE + SOURCE
  it = make(0, num_epochs=3)
  stream = list(it)
  assert len(stream) == 3 * N and all(sorted(stream[e * N:(e + 1) * N]) == SOURCE for e in range(3))
  with pytest.raises(StopIteration):
    next(it)


@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_are_disjoint_and_cover_the_dataset(count):
  shards = [sorted(make(5, shard_index=i, shard_count=count, num_epochs=1)) for i in range(count)]
  for i, s in enumerate(shards):
    assert s == SOURCE[i::count]  # strided: record j goes to process j % count
  assert sorted(x for s in shards for x in s) == SOURCE


def test_even_shards_give_every_process_the_same_length():
  shards = [list(make(5, shard_index=i, shard_count=3, num_epochs=1, even_shards=True)) for i in range(3)]
  assert [len(s) for s in shards] == [85, 85, 85]
  assert sorted(x for s in shards for x in s) == SOURCE[:255]


def test_default_shard_is_the_jax_process():
  import jax
  assert (jax.process_index(), jax.process_count()) == (0, 1)
  assert list(make_iterator(SOURCE, seed=1, num_epochs=1)) == list(make(1, num_epochs=1))


def _resume_case(k, n=N, **kw):
  """Take k items, save the state through JSON, and check a new iterator continues the uninterrupted one."""
  full = make(11, n, **kw)
  head = elements(full, k)
  state = json.loads(json.dumps(full.get_state()))
  tail = elements(full, n // (kw.get("batch_size") or 1) + 3)  # reaches into the next epoch
  resumed = make(11, n, **kw)
  resumed.set_state(state)
  assert elements(resumed, len(tail)) == tail
  fresh = elements(make(11, n, **kw), k + len(tail))
  assert head + tail == fresh


@pytest.mark.parametrize("k", [0, 1, 17, N - 1, N, N + 1, 2 * N + 3])
def test_resume_elements(k):
  _resume_case(k)


@pytest.mark.parametrize("k, batch_size", [(24, 10), (48, 5), (3, 7)])
def test_resume_batches_240(k, batch_size):
  # (24, 10), (48, 5): the state sits exactly on an epoch boundary of 240 records.
  _resume_case(k, n=N_EVEN, batch_size=batch_size)


@pytest.mark.parametrize("k, batch_size", [(32, 8), (33, 8)])
def test_resume_batches_257(k, batch_size):
  # Batch 32 (elements 256..263) straddles the end of epoch 0: resume just before it and just after it.
  _resume_case(k, batch_size=batch_size)


def test_resume_with_shards_and_finite_epochs():
  kw = dict(shard_index=2, shard_count=3, num_epochs=2, batch_size=4, drop_remainder=False)
  full = list(make(4, **kw))
  it = make(4, **kw)
  head = elements(it, 5)
  it2 = make(4, **kw)
  it2.set_state(json.loads(json.dumps(it.get_state())))
  assert head + [b.tolist() for b in it2] == [b.tolist() for b in full]


def test_state_from_other_arguments_is_refused():
  state = make(1, batch_size=4).get_state()
  with pytest.raises(ValueError, match="seed: saved 1, now 2"):
    make(2, batch_size=4).set_state(state)
  with pytest.raises(ValueError, match="shard_count"):
    make(1, batch_size=4, shard_count=2).set_state(state)
  with pytest.raises(ValueError, match="next_index"):
    make(1).set_state({"seed": 1})


def test_batches_are_chunks_of_the_element_stream():
  stream = elements(make(9), 3 * N)
  batches = elements(make(9, batch_size=8), (3 * N) // 8)
  assert batches == [stream[i * 8:(i + 1) * 8] for i in range((3 * N) // 8)]


def test_last_batch_with_finite_epochs():
  kept = [b.tolist() for b in make(2, shuffle=False, num_epochs=1, batch_size=8, drop_remainder=False)]
  assert kept == [SOURCE[i:i + 8] for i in range(0, N, 8)] and len(kept[-1]) == 1
  dropped = [b.tolist() for b in make(2, shuffle=False, num_epochs=1, batch_size=8)]
  assert dropped == kept[:-1]


def test_collate_dicts_of_arrays_and_python_objects():
  items = [{"pixels": np.full((2, 3), i, np.float32), "n": i, "ok": i % 2 == 0, "id": f"x{i}",
            "meta": {"t": np.float64(i / 2), "tags": ["a"] * i}} for i in range(4)]
  b = collate(items)
  assert b["pixels"].shape == (4, 2, 3) and b["pixels"].dtype == np.float32
  np.testing.assert_array_equal(b["pixels"][:, 0, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(b["n"], [0, 1, 2, 3])
  assert b["ok"].dtype == bool and b["ok"].tolist() == [True, False, True, False]
  assert b["id"] == ["x0", "x1", "x2", "x3"]
  np.testing.assert_array_equal(b["meta"]["t"], [0, 0.5, 1, 1.5])
  assert b["meta"]["tags"] == [[], ["a"], ["a", "a"], ["a", "a", "a"]]


def test_transform_and_record_batches():
  records = [RLRecord(problem=f"q{i} <image>", solution="A", data_source="lvb", video=f"/v/{i}.mp4",
                      answer_type="multiple_choice", doc_id=i, extra_info={"answer_type": "multiple_choice"})
             for i in range(10)]
  it = make_iterator(records, seed=0, shard_index=0, shard_count=1, batch_size=4, num_epochs=1)
  batches = list(it)
  assert [len(b) for b in batches] == [4, 4] and all(isinstance(b, list) for b in batches)
  assert all(isinstance(r, RLRecord) for b in batches for r in b)
  ids = [r.doc_id for b in batches for r in b]
  assert len(set(ids)) == 8
  order = list(make_iterator(list(range(10)), seed=0, shard_index=0, shard_count=1, num_epochs=1))
  assert ids == order[:8]  # the same permutation as for any 10-element source with this seed
  doubled = make_iterator(records, seed=0, shard_index=0, shard_count=1, batch_size=4,
                          transform=lambda r: {"id": r.doc_id, "x": np.array([r.doc_id, 2 * r.doc_id])})
  b = next(doubled)
  np.testing.assert_array_equal(b["x"], np.stack([np.array([i, 2 * i]) for i in order[:4]]))


def test_tfds_source_through_the_pipeline(tmp_path):
  from zoomer_jax.data.tfds_builders import build_rl_dataset, rl_source
  objs = [{"problem": f"q{i} <image>", "solution": "B", "data_source": "mvbench", "videos": [f"{i}.mp4"],
           "extra_info": {"answer_type": "multiple_choice"}, "doc_id": i} for i in range(12)]
  (tmp_path / "rl.json").write_text(json.dumps(objs))
  source = rl_source(build_rl_dataset({"train": [str(tmp_path / "rl.json")]}, str(tmp_path / "tfds")), "train")
  shards = [list(make_iterator(source, seed=3, shard_index=i, shard_count=2, num_epochs=1)) for i in range(2)]
  assert sorted(r.doc_id for s in shards for r in s) == list(range(12))
  assert {r.doc_id % 2 for r in shards[1]} == {1}
  it = make_iterator(source, seed=3, shard_index=0, shard_count=1, batch_size=5)
  take(it, 3)
  it2 = make_iterator(source, seed=3, shard_index=0, shard_count=1, batch_size=5)
  it2.set_state(json.loads(json.dumps(it.get_state())))
  assert next(it2) == next(it)
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("kw, match", [
    (dict(shard_index=2, shard_count=2), "shard_index"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    make(0, **kw)


def test_empty_shard_is_an_error():
  with pytest.raises(ValueError, match="shard 3 of 4 is empty"):
    make_iterator([1, 2, 3], seed=0, shard_index=3, shard_count=4)


# ---------------------------------------------------------------- the global stream (make_stream / RecordStream)
class ThreadGather:
  """A host allgather among `n` threads standing in for processes: each call returns every thread's array."""

  def __init__(self, n: int):
    import threading
    self.slots, self.barrier = [None] * n, threading.Barrier(n)

  def for_process(self, pid: int):
    def gather(x):
      self.slots[pid] = np.asarray(x)
      self.barrier.wait()
      out = np.stack(self.slots)
      self.barrier.wait()  # nobody overwrites a slot before everyone has read it
      return out
    return gather


def test_stream_is_the_one_shard_iterator_order_and_resumes():
  it, stream = make(5), make_stream(SOURCE, seed=5)
  assert [next(stream) for _ in range(2 * N + 3)] == elements(it, 2 * N + 3)
  assert stream.get_state() == it.get_state()  # the same state format (checkpoints written before still load)
  again = make_stream(SOURCE, seed=5)
  again.set_state(json.loads(json.dumps(stream.get_state())))
  assert [next(again) for _ in range(7)] == elements(it, 7)
  with pytest.raises(ValueError, match="seed: saved 5, now 6"):
    make_stream(SOURCE, seed=6).set_state(stream.get_state())
  finite = make_stream(list(range(3)), seed=0, num_epochs=1)
  assert sorted(next(finite) for _ in range(3)) == [0, 1, 2]
  with pytest.raises(StopIteration):
    next(finite)


def test_take_reads_only_the_given_rows_and_skips_like_reading_one_by_one():
  seen = []
  stream = make_stream(SOURCE, seed=1, transform=lambda x: seen.append(x) or x, workers=3)
  ref = make_stream(SOURCE, seed=1)
  want = [next(ref) for _ in range(40)]
  # Another process measures the other rows; here a stand-in gather supplies their (true) measures.
  others = np.array([[-1 if r in (1, 6) else want[r]] for r in range(8)])
  local, info, skipped = stream.take(8, [1, 6], measure=lambda x: (x,),
                                     gather=lambda x: np.stack([np.asarray(x), others]))
  assert local == {1: want[1], 6: want[6]} and skipped == 0 and stream.next_index == 8
  assert sorted(seen) == sorted([want[1], want[6]]) and stream.decoded == 2  # the other rows were never read
  assert info[:, 0].tolist() == want[:8]
  with pytest.raises(RuntimeError, match=r"no process read stream positions \[8, 9, 11"):
    stream.take(8, [2, 7], measure=lambda x: (x,))  # alone, nobody reads rows 0, 1, 3...
  stream.next_index = 8
  # Skipping: rows are the first n accepted elements from the position on, as a one-by-one read would take.
  keep = lambda m: m[0] % 3 != 0
  accepted = [x for x in want[8:] if keep((x,))]
  local, info, skipped = stream.take(8, range(8), measure=lambda x: (x,), accept=keep)
  assert [local[r] for r in range(8)] == accepted[:8] and info[:, 0].tolist() == accepted[:8]
  end = want.index(accepted[7]) + 1
  assert skipped == end - 8 - 8 > 0 and stream.next_index == end


def test_take_in_two_simulated_processes_equals_one_process():
  """Two threads with their own streams and a real allgather between them: together they hold exactly the
  one-process batches (with skips), each reading fewer elements; both end at the same position."""
  import threading
  keep = lambda m: m[0] % 4 != 1
  rows = {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}
  one = make_stream(SOURCE, seed=2, transform=lambda x: x)
  want = [one.take(8, range(8), measure=lambda x: (x,), accept=keep) for _ in range(5)]
  gather, got, streams = ThreadGather(2), {}, {}

  def process(pid):
    streams[pid] = make_stream(SOURCE, seed=2, transform=lambda x: x)
    got[pid] = [streams[pid].take(8, rows[pid], measure=lambda x: (x,), accept=keep, gather=gather.for_process(pid))
                for _ in range(5)]
  threads = [threading.Thread(target=process, args=(p,)) for p in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert sum(s for _, _, s in want) > 0  # the skipping path ran
  for step, (w_local, w_info, w_skipped) in enumerate(want):
    for pid in (0, 1):
      local, info, skipped = got[pid][step]
      assert local == {r: w_local[r] for r in rows[pid]}, (step, pid)
      assert np.array_equal(info, w_info) and skipped == w_skipped
  assert streams[0].get_state() == streams[1].get_state() == one.get_state()
  assert max(streams[0].decoded, streams[1].decoded) < one.decoded


def test_stream_transform_errors_name_the_position():
  def bad(x):
    if x == 4:
      raise ValueError("cannot read image r4.png")
    return x
  stream = make_stream(list(range(6)), seed=0, shuffle=False, transform=bad)
  with pytest.raises(ValueError, match=r"stream position 10 \(epoch 1\): cannot read image r4.png"):
    stream.read([10])
