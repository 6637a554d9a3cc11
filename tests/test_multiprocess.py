"""Two JAX processes (4 CPU devices each) form one 8-device mesh; the sharded forward equals one process's."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import hf_oracle as O
import tolerances as tol
import zoomer_jax
from zoomer_jax.parallel import distributed

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# data axis across the processes; fsdp spanning both; tensor spanning both.
MESHES = ("2,2,2", "1,8,1", "1,1,8")
TIMEOUT_S = 480  # a guard against a hang, not a speed bar: the GRPO job takes ~240 s on 2 busy cores


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
  with open(path, errors="replace") as f:
    text = "".join(line for line in f if not line.startswith("[Gloo]"))
  return text[-n:]


def _run_workers(args: list[str], out_dir: str, n: int = 2, job: list[str] | None = None) -> None:
  """Starts `n` workers, waits for all; on a failure or timeout kills the rest and fails with their stderr.

  Workers run multiprocess_worker.py with (coordinator, n, i, *args), or with `job` the command `job` with the
  three values in JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (as a training job reads them).
  """
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
  coordinator = f"127.0.0.1:{_free_port()}"
  procs, logs = [], []
  for i in range(n):
    logs.append(os.path.join(out_dir, f"worker{i}.log"))
    with open(logs[-1], "w") as log:
      if job is None:
        cmd, worker_env = [sys.executable, os.path.join(TESTS, "multiprocess_worker.py"), coordinator, str(n),
                           str(i), *args], env
      else:
        cmd = job
        worker_env = dict(env, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
      procs.append(subprocess.Popen(cmd, env=worker_env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one died: the others would wait for it in a collective
      if time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(p.returncode != 0 for p in procs):
    report = "\n".join(f"--- worker {i} (exit {p.returncode}), last output:\n{_tail(log)}"
                       for i, (p, log) in enumerate(zip(procs, logs)))
    raise AssertionError(f"multi-process workers failed or passed {TIMEOUT_S} s:\n{report}")


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path, rng, measure):
  ckpt = O.save_hf(O.make_hf_model(O.tiny_hf_config(heads=4, kv_heads=2), seed=12), str(tmp_path / "ckpt"))
  prompt = O.build_prompt(rng, [[("text", 5), ("image", (1, 4, 6)), ("text", 4), ("video", (2, 4, 4), 1.0)],
                                [("text", 7), ("image", (1, 4, 4)), ("text", 2)]])
  np.savez(tmp_path / "prompt.npz", **prompt.ours())
  single = zoomer_jax.load_hf(ckpt)
  want = np.asarray(single(**prompt.ours()))
  exported = _tensors(zoomer_jax.export_hf(single, tmp_path / "export_single"))

  _run_workers([ckpt, str(tmp_path / "prompt.npz"), str(tmp_path), *MESHES], str(tmp_path))

  for pid in range(2):
    info = json.loads((tmp_path / f"info{pid}.json").read_text())
    assert (info["process_index"], info["process_count"]) == (pid, 2)
    assert (info["device_count"], info["local_device_count"]) == (8, 4)
    for ici in MESHES:  # the mesh spans both processes, so the logits had to be gathered
      assert info["meshes"][ici] == {"multi_process": True, "logits_fully_addressable": False}
  valid = prompt.attention_mask.astype(bool)
  diffs = {}
  for ici in MESHES:
    got = np.load(tmp_path / f"logits_{ici}.npy")
    assert got.shape == want.shape, ici
    diffs[ici] = float(np.abs(got - want)[valid].max())
    measure(f"mesh({ici})", diffs[ici])
  assert all(d <= tol.LOGITS_FP32 for d in diffs.values()), diffs
  for ici in MESHES:  # an export from parameters spread over two processes equals one process's export
    got = _tensors(tmp_path / f"export_{ici}")
    assert got.keys() == exported.keys(), ici
    for key in got:
      np.testing.assert_array_equal(got[key], exported[key], err_msg=f"{ici}: {key}")


def _tensors(path) -> dict:
  from zoomer_jax.checkpoint.safetensors_io import SafetensorsFile, checkpoint_files
  out = {}
  for f in checkpoint_files(path):
    st = SafetensorsFile(f)
    out.update({k: np.array(st.get(k)) for k in st.keys()})
  return out


def test_initialize_single_process_is_a_no_op(monkeypatch):
  monkeypatch.setattr(distributed, "_cluster_detected", lambda: False)
  jax.devices()
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()


def test_initialize_fails_clearly(monkeypatch):
  monkeypatch.setattr(distributed, "_cluster_detected", lambda: False)
  with pytest.raises(ValueError, match="pass coordinator, num_processes and process_id together"):
    distributed.initialize("127.0.0.1:1234")
  jax.devices()  # the backend now exists: too late to join a multi-process run
  with pytest.raises(RuntimeError, match="must run before any other JAX use"):
    distributed.initialize("127.0.0.1:1234", 2, 0)
  monkeypatch.setattr(distributed, "_cluster_detected", lambda: True)
  with pytest.raises(RuntimeError, match="must run before any other JAX use"):
    distributed.initialize()
  assert not jax.distributed.is_initialized()


def test_to_host_on_a_single_process():
  x = np.arange(24, dtype=np.float32).reshape(8, 3)
  mesh = jax.make_mesh((8,), ("d",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  got = distributed.to_host({"a": sharded, "b": x[0]})
  assert isinstance(got["a"], np.ndarray) and np.array_equal(got["a"], x)
  assert np.array_equal(got["b"], x[0])


def _job_on_one_and_two_processes(tmp_path, args: list[str]) -> tuple[list[dict], list[dict]]:
  """`python -m zoomer_jax train ARGS` on two processes (4 devices each) and on one (8 devices): metrics rows."""
  _run_workers([], str(tmp_path), job=[sys.executable, "-m", "zoomer_jax", "train", *args,
                                       f"--config.workdir={tmp_path / 'two'}"])
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
  subprocess.run([sys.executable, "-m", "zoomer_jax", "train", *args, f"--config.workdir={tmp_path / 'one'}"],
                 env=env, check=True, capture_output=True, timeout=TIMEOUT_S)
  read = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]
  return read("two"), read("one")


SMALL_MODEL = ["--config.model.text.num_hidden_layers=1", "--config.model.vision.depth=2",
               "--config.model.vision.fullatt_block_indexes=(1,)", "--config.trainer.progress=False",
               "--config.trainer.tensorboard=False"]


@pytest.mark.slow
def test_two_process_sft_job_matches_one_process(tmp_path):
  """`python -m zoomer_jax train` started on two hosts (4 devices each, one 8-device mesh): the same losses as
  one 8-device process, while each process read and encoded only the rows its devices hold; a record longer than
  cutoff_len is skipped alike; only process 0 writes metrics; Orbax checkpoints come from both."""
  from train_data import write_sft_records
  data = write_sft_records(str(tmp_path / "data"), 10)
  records = json.load(open(data))
  records[3]["messages"][4]["content"] = "<think>" + "long " * 300 + "</think><answer>D</answer>"  # ~440 tokens
  with open(data, "w") as f:
    json.dump(records, f)
  # mesh (data 2, fsdp 2, tensor 2): a micro-batch of 4 rows is split over data x fsdp, 2 rows per process.
  args = ["--config=sft_tiny", f"--config.data.train_files=('{data}',)", "--config.train.total_steps=3",
          "--config.data.batch_size=8", "--config.data.micro_batch_size=4", "--config.mesh.ici=(2,2,2)",
          "--config.data.cutoff_len=300", *SMALL_MODEL]
  two, one = _job_on_one_and_two_processes(tmp_path, args)
  assert [r["step"] for r in two] == [1, 2, 3]  # written once (process 0), not once per process
  for a, b in zip(two, one):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=tol.MULTIPROCESS_LOSS_REL)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=tol.MULTIPROCESS_GRAD_REL)
    assert a["skipped_too_long"] == b["skipped_too_long"]
    # One process encodes all 8 rows (and each skipped record); process 0 of two encodes its 4 rows (and, when
    # a skip shifts the rows, the records that moved into them).
    assert b["records_decoded"] == 8 + b["skipped_too_long"]
    assert 4 <= a["records_decoded"] < b["records_decoded"]
    if a["skipped_too_long"] == 0:
      assert a["records_decoded"] == 4
  assert sum(r["skipped_too_long"] for r in one) >= 1  # the long record came up: the skip path ran
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3"]


@pytest.mark.slow
def test_two_process_grpo_job_matches_one_process(tmp_path):
  """GRPO on two processes with the continuous engine, one per data-parallel replica (a replica per process): each
  process rolls out its replica's group, keeps its pixels, and trains them on the rows its chips hold (8 rows, one
  per chip), so no pixels cross between the processes; rewards, response lengths and frames equal one process's
  exactly, losses closely."""
  from train_data import write_rl_records
  data = write_rl_records(str(tmp_path / "data"), 4)
  args = ["--config=grpo_tiny", f"--config.data.train_files=('{data}',)", "--config.trainer.total_steps=2",
          "--config.data.train_batch_size=2", "--config.rollout.n=4", "--config.rollout.response_length=8",
          "--config.rollout.max_generation_round=2", "--config.rollout.batch_size=8",
          "--config.actor.ppo_mini_batch_size=2", "--config.actor.ppo_micro_batch_size=8",
          "--config.algorithm.rejection_sample=False", "--config.trainer.save_freq=5",
          "--config.rollout.engine=continuous", *SMALL_MODEL]
  two, one = _job_on_one_and_two_processes(tmp_path, args)
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
  for a, b in zip(two, one):
    for key in ("reward/mean", "acc/mean", "reward/format", "response_length/mean", "frames/mean", "tool_calls/mean",
                "rounds/1_ratio", "advantage/abs_mean"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for key in ("loss", "actor/entropy", "actor/kl_loss", "actor/pg_loss"):
      np.testing.assert_allclose(a[key], b[key], rtol=tol.MULTIPROCESS_LOSS_REL, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=tol.MULTIPROCESS_GRAD_REL)
    assert a["rollout/engines_per_process"] == 1 and a["rollout/pixel_bytes_sent"] == 0
    assert 0 < a["rollout/pixel_bytes_held"] < b["rollout/pixel_bytes_held"]  # its own group's images only
  assert one[1]["actor/kl_loss"] > 0 and one[0]["frames/mean"] > 0  # the policy moved; frames were read
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_two_process_grpo_rows_are_built_where_their_pixels_are(tmp_path):
  """GRPO's training micro-batches from trajectories whose pixels only the process that made them holds (one
  rollout engine per replica, `pixels="own"`): each row takes a trajectory of the replica whose chip holds it, so
  a process builds its rows from its own pixels; of 12 trajectories (9 from replica 0, 3 from replica 1) the one
  surplus trajectory trained on replica 1's chips is the only one whose pixels travel, and the global batches
  equal one process's batches of the same trajectories."""
  import multiprocess_worker as W
  from zoomer_jax.train.placement import place
  _run_workers(["placement", str(tmp_path)], str(tmp_path))
  got = [json.loads((tmp_path / f"placement{p}.json").read_text()) for p in range(2)]
  homes, order, maker = got[0]["homes"], got[0]["order"], got[0]["maker"]
  assert all((g["homes"], g["order"], g["maker"]) == (homes, order, maker) for g in got)
  assert homes == [0] * 4 + [1] * 4 and sorted(maker.values()) == [0, 1]  # a replica per process
  assert order == place(W.PLACEMENT_REPLICAS, homes)
  moved = [k for pos, k in enumerate(order) if W.PLACEMENT_REPLICAS[k] != homes[pos % 8]]
  assert moved == [4]
  p0, p1 = maker["0"], maker["1"]
  assert got[p0]["sent"] == got[0]["pixel_bytes"][4] > 0 and got[p1]["sent"] == 0
  assert got[p0]["held"] == list(range(9))  # its own; nothing else arrived
  assert got[p1]["held"] == [4, 9, 10, 11]  # its own, and the one its row 7 trains on
  assert [g["unequal"] for g in got] == [[[], []], [[], []]]


@pytest.mark.slow
def test_two_process_replicas_take_waiting_tasks_from_each_others_blocks(tmp_path, measure):
  """The joining rollout on two processes, one replica each: process 0's first task is held until every other
  task is done, so process 1's engine takes every task still waiting, its own block's first, then process 0's
  (through the distributed runtime's counters), and both processes end with every trajectory, sampled ones
  included, equal to one engine's over every task in one process. GRPO's training rows follow the blocks the
  tasks were given, not who made them: the micro-batches are those of a rollout without joining, and the pixels
  of process 0's two tasks that process 1 made travel to process 0."""
  import media
  import multiprocess_worker as W
  import zoomer_jax
  from flax import nnx
  from zoomer_jax.agent.engine import continuous_rollout
  from zoomer_jax.config_loader import load
  from zoomer_jax.model.config import ModelConfig
  from zoomer_jax.model.qwen25vl import Qwen25VL
  from zoomer_jax.text import build_tiny_tokenizer

  video = media.write_video(str(tmp_path / "v.mp4"), 200, 10.0, (64, 80))
  model = Qwen25VL(ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model), rngs=nnx.Rngs(4))
  ckpt = str(zoomer_jax.export_hf(model, tmp_path / "ckpt"))
  tasks, cfg, engine = W.queue_setup(video)
  want = W.rollout_record(continuous_rollout(zoomer_jax.load_hf(ckpt), build_tiny_tokenizer(), tasks, cfg,
                                             jax.random.key(7), script=W.queue_script, engine=engine), [])
  _run_workers(["queue", ckpt, video, str(tmp_path)], str(tmp_path))
  got = [json.loads((tmp_path / f"queue{p}.json").read_text()) for p in range(2)]
  assert got[0]["done_here"] == [0] and got[1]["done_here"] == [1, 2, 3, 4, 5]  # rows 1, 2: process 0's block
  assert got[1]["done_order"] == [3, 4, 5, 1, 2]  # its own block first
  for p, g in enumerate(got):
    assert g["replicas"] == [0, 1, 1, 1, 1, 1] and g["homes"] == [0, 0, 0, 1, 1, 1]
    assert g["order"] == [0, 3, 1, 4, 2, 5]  # row 0 (replica 0's chips) takes tasks 0-2, row 1 tasks 3-5
    assert g["unequal"] == [[], [], []]
    for a, b in zip(want["trajs"], g["trajs"]):
      diff = max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))
      measure(f"process{p}_{a['id']}_logprob_diff", diff)
      rest = lambda t: {k: v for k, v in t.items() if k != "logprobs"}  # noqa: E731
      assert diff <= tol.LOGPROB_FP32 and rest(a) == rest(b)
  assert got[0]["held"] == [0, 1, 2] and got[1]["held"] == [1, 2, 3, 4, 5]  # 1, 2: made by 1, trained on 0
  assert got[0]["sent"] == 0 and got[1]["sent"] > 0


def test_pack_round_trips_exactly_and_share_is_local_in_one_process():
  rng = np.random.default_rng(0)
  tree = [[3, {"value": [0.1, rng.normal(size=(5, 1176)).astype(np.float32), np.zeros((0, 3), np.int64),
                         np.float64(1 / 3), np.int64(2**40), np.arange(6, dtype=np.uint16).reshape(2, 3)[:, ::2]]}],
          [0, {"error": "video x.mp4: cannot décode"}], [1, (None, True, float("inf"), "s")]]
  got = distributed.unpack(distributed.pack(tree))
  assert got[0][0] == 3 and got[1] == [0, {"error": "video x.mp4: cannot décode"}]
  assert got[2] == [1, [None, True, float("inf"), "s"]]
  for a, b in zip(got[0][1]["value"], tree[0][1]["value"]):
    assert type(a) is type(b) or isinstance(b, np.ndarray)
    assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
  assert got[0][1]["value"][0] == 0.1  # a JSON float keeps every bit
  with pytest.raises(TypeError, match="dict keys must be str"):
    distributed.pack({1: 2})
  with pytest.raises(TypeError, match="cannot pack a set"):
    distributed.pack([{1}])
  local = {0: {"value": [1.0]}}
  assert distributed.share_by_key(local) is local  # one process: nothing is communicated


def test_owned_rows_are_contiguous_blocks_covering_the_batch():
  from zoomer_jax.agent.rollout import owned_rows
  assert owned_rows(5) == [0, 1, 2, 3, 4]  # one process owns everything
  assert [owned_rows(4, p, 2) for p in range(2)] == [[0, 1], [2, 3]]
  assert [owned_rows(5, p, 2) for p in range(2)] == [[0, 1, 2], [3, 4]]  # row i -> i * 2 // 5
  assert [owned_rows(2, p, 4) for p in range(4)] == [[0], [], [1], []]
  for b, n in [(7, 3), (8, 8), (3, 5), (64, 6)]:
    blocks = [owned_rows(b, p, n) for p in range(n)]
    assert sum(blocks, []) == list(range(b))  # every row once, in process order
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["continuous", "lockstep", "replicas"])
def test_two_process_rollout_decodes_each_video_on_its_owner_only(tmp_path, monkeypatch, measure, engine):
  """A scripted rollout of 4 rows on two processes (one 8-device mesh), with either engine: process p reads the
  overviews and cuts the clips of its own rows only (rows 0-1 on process 0, 2-3 on process 1), and both processes
  end with the trajectories, tool-call logs and events of one process running all 4 rows - an unreadable video and
  a clip that fails to decode reported alike everywhere. Any other failure of one process's extraction is raised
  on both (no process is left waiting in a collective). The continuous engine's processes agree on when each clip
  arrives, so they see the same events in the same order; one process, whose clips arrive when they do, sees the
  same events per row. With "replicas" (one engine per data-parallel replica: here one per process, each on its own
  4 chips), each process runs its own rows alone and sees their events only; the trajectories are exchanged at the
  end, and a failure is raised on both all the same.
  """
  import media
  import multiprocess_worker as W
  import zoomer_jax
  from flax import nnx
  from zoomer_jax.agent import engine as E
  from zoomer_jax.agent import rollout as R
  from zoomer_jax.config_loader import load
  from zoomer_jax.model.config import ModelConfig
  from zoomer_jax.model.qwen25vl import Qwen25VL
  from zoomer_jax.parallel.mesh import make_mesh
  from zoomer_jax.text import build_tiny_tokenizer

  good = media.write_video(str(tmp_path / "good.mp4"), 200, 10.0, (64, 80))
  torn = media.write_torn_mjpeg(str(tmp_path / "torn.avi"), range(25, 35))  # seconds 2.5-3.5 undecodable
  (tmp_path / "broken.mp4").write_bytes(b"not a video" * 100)
  tasks = [R.Task(good, "<image>\nWhat colour is the square? A. red B. blue", "B", "t0"),
           R.Task(str(tmp_path / "broken.mp4"), "<image>\nAnything?", "A", "t1"),
           R.Task(torn, "<image>\nIs there a square? A. yes B. no", "A", "t2"),
           R.Task(good, "<image>\nIs it moving? A. yes B. no", "A", "t3")]
  with open(tmp_path / "tasks.json", "w") as f:
    json.dump([dict(video=t.video, problem=t.problem, answer=t.answer, id=t.id) for t in tasks], f)
  model = Qwen25VL(ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model), rngs=nnx.Rngs(4))
  ckpt = str(zoomer_jax.export_hf(model, tmp_path / "ckpt"))

  # One process, all 8 devices in the same mesh: the reference, which must not communicate at all.
  def no_collective(*a):
    raise AssertionError("a collective was called in a single process")
  monkeypatch.setattr(R, "share_by_key", no_collective)
  monkeypatch.setattr(E, "host_allgather", no_collective)
  monkeypatch.setattr(distributed, "ragged_allgather", no_collective)
  monkeypatch.setattr(R, "_overview", R._overview)  # restored after the test ...
  monkeypatch.setattr(R, "_clip", R._clip)
  monkeypatch.setattr(E, "_clip", E._clip)
  want_decoded = {}
  W.count_decodes(R, want_decoded)  # ... which wraps both to count their calls
  mesh = make_mesh((2, 2, 2))
  sharded = zoomer_jax.load_hf(ckpt, mesh=mesh)
  events = []
  with jax.set_mesh(mesh):
    trajs = W.run_rollout(engine, sharded, build_tiny_tokenizer(), tasks, jax.random.key(3),
                          on_event=lambda *e: events.append(e), script=W.rollout_script)
  want = W.rollout_record(trajs, events)

  start = time.monotonic()
  _run_workers(["rollout", ckpt, str(tmp_path / "tasks.json"), str(tmp_path), engine], str(tmp_path))
  measure(f"two_process_{engine}_rollout_wall_s", time.monotonic() - start)
  got = [json.loads((tmp_path / f"rollout_{engine}{p}.json").read_text()) for p in range(2)]

  # The scenario happened: zooms that worked, a clip that failed to decode, an unreadable video.
  t0, t1, t2, t3 = want["trajs"]
  assert [("error" in c) for c in t0["calls"]] == [False, False] and t0["answer"] == "B"
  assert t1["finish_reason"] == "video_error" and "broken.mp4" in t1["calls"][0]["error"]
  assert [("error" in c) for c in t2["calls"]] == [True, False] and t2["calls"][1]["frames"] == 2
  assert "torn.avi" in t2["calls"][0]["error"]  # the decoder's failure names the file
  assert (t3["answer"], t3["calls"]) == ("A", [])
  # Each process decoded only its own rows' videos; together exactly what one process decoded.
  for p, g in enumerate(got):
    assert g["owned"] == [[0, 1], [2, 3]][p]
    ids = [tasks[i].id for i in g["owned"]]
    assert sorted(g["decoded"]["_overview"]) == ids
    assert set(g["decoded"]["_clip"]) <= set(ids)
    for name in ("_overview", "_clip"):
      measure(f"process{p}_{name[1:]}_calls", len(g["decoded"][name]))
  for name in ("_overview", "_clip"):
    assert sorted(got[0]["decoded"][name] + got[1]["decoded"][name]) == sorted(want_decoded[name]), name
    measure(f"one_process_{name[1:]}_calls", len(want_decoded[name]))
  assert len(want_decoded["_overview"]) == 4 and len(want_decoded["_clip"]) == 4
  assert [len(g["decoded"]["_clip"]) for g in got] == [2, 2]
  # A bug (not a video error) in process 1's clip of row 2 is raised on both processes, by its type.
  for g in got:
    name, message = g["fatal"]
    assert name == "TypeError" and "simulated bug in the clip extraction" in message
    assert ("process 1" if engine == "replicas" else "row 2") in message, message
  per_row = lambda ev: {i: [e for e in ev if e[1] == i] for i in range(len(tasks))}
  if engine == "replicas":  # each process saw its own rows' events, those of one process
    for g in got:
      assert {i: v for i, v in per_row(g["events"]).items() if v} == {i: per_row(want["events"])[i]
                                                                       for i in g["owned"]}
    assert got[0]["trajs"] == got[1]["trajs"]
  else:  # both processes hold the same trajectories and saw the same events, bit for bit ...
    assert got[0]["trajs"] == got[1]["trajs"] and got[0]["events"] == got[1]["events"]
  # ... and those of one process: the same tokens, frames and tool log, log-probs within the cross-process bound.
  if engine == "lockstep":  # every turn and observation at the same point of a round
    assert got[0]["events"] == want["events"]
  if engine != "replicas":
    assert per_row(got[0]["events"]) == per_row(want["events"])
  for a, b in zip(got[0]["trajs"], want["trajs"]):
    la, lb = np.array(a.pop("logprobs")), np.array(b.pop("logprobs"))
    assert a == b, a["id"]
    assert la.shape == lb.shape, a["id"]
    diff = float(np.abs(la - lb).max(initial=0.0))
    measure(f"{a['id']}_logprob_two_vs_one_process", diff)
    assert diff <= tol.MULTIPROCESS_LOGPROB_FP32, (a["id"], diff)
