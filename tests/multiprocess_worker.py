"""One process of the multi-process tests: joins the run, then either

  python multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT PROMPT_NPZ OUT_DIR ICI [ICI ...]

loads the checkpoint into each global mesh (ICI a mesh shape such as 2,2,2), runs the forward on the saved prompt,
writes OUT_DIR/info{PROCESS_ID}.json (device counts) and (process 0) OUT_DIR/logits_{ICI}.npy and an HF export
OUT_DIR/export_{ICI}/ per mesh; or

  python multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID rollout CHECKPOINT TASKS_JSON OUT_DIR ENGINE

runs the scripted agent rollout (`ROLLOUT_SCRIPT`, `rollout_config`) of the tasks on the 8-device mesh (2,2,2)
with ENGINE (`run_rollout`: "lockstep", "continuous" or "replicas") and writes
OUT_DIR/rollout_{ENGINE}{PROCESS_ID}.json:
this process's trajectories, events and the videos it decoded, then the error that the same rollout raised when
one row's clip extraction has a bug; or

  python multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID queue CHECKPOINT VIDEO OUT_DIR

runs a joining rollout whose waiting tasks move between the processes (`queue_main`); or

  python multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID placement OUT_DIR

builds GRPO's training micro-batches from trajectories whose pixels only the process that made them holds
(`placement_main`).
"""

import hashlib
import json
import os
import sys

from zoomer_jax.parallel import distributed


# The scripted turns of the rollout test, by row: row 0 zooms twice (both clips readable), row 1's video is
# unreadable, row 2 asks first for seconds 2-4 of a video whose frames 25-34 are corrupt (the clip fails) and
# then for 10-12 (it works), row 3 answers at once.
ROLLOUT_SCRIPT = {
    0: ['<think>too coarse</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>',
        '<think>later</think><video_zoom>{"segment": [10, 13], "fps": 1}</video_zoom>',
        "<think>seen it</think><answer>B</answer><|im_end|>"],
    2: ['<think>too coarse</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>',
        '<think>elsewhere</think><video_zoom>{"segment": [10, 12], "fps": 1}</video_zoom>',
        "<think>seen it</think><answer>A</answer><|im_end|>"],
    3: ["<think>easy</think><answer>A</answer><|im_end|>"],
}


def rollout_script(row: int, rnd: int):
  turns = ROLLOUT_SCRIPT.get(row, [])
  return turns[rnd] if rnd < len(turns) else None


def rollout_config():
  from zoomer_jax.agent import protocol as P
  from zoomer_jax.agent.rollout import AgentConfig
  from zoomer_jax.sampling import SamplingParams
  small = 56 * 56  # 4 tokens a frame
  return AgentConfig(tool=P.ToolConfig(), sampling=SamplingParams(temperature=1.0, max_new_tokens=40),
                     decode_chunk=16, max_pixels=small, min_pixels=small, workers=2)


def run_rollout(engine: str, model, tok, tasks, key, **kw):
  """The rollout of `engine` ("lockstep": `rollout.rollout`; "continuous": `engine.continuous_rollout` with small
  pages and steps, so that sequences come and go; "replicas": `replicas.replicated_rollout`, the same engines,
  one per data-parallel replica of the model's mesh)."""
  from zoomer_jax.agent import engine as E
  from zoomer_jax.agent import rollout as R
  if engine == "lockstep":
    return R.rollout(model, tok, tasks, rollout_config(), key, **kw)
  if engine == "replicas":
    from zoomer_jax.agent.replicas import replicated_rollout
    return replicated_rollout(model, tok, tasks, rollout_config(), key, engine=E.EngineConfig(page_size=8,
                                                                                               step_tokens=64), **kw)
  return E.continuous_rollout(model, tok, tasks, rollout_config(), key, engine=E.EngineConfig(page_size=8,
                                                                                               step_tokens=64), **kw)


def set_clip(fn) -> None:
  """Makes `fn` the clip extraction of both engines (the continuous engine imports the rollout's by name)."""
  from zoomer_jax.agent import engine as E
  from zoomer_jax.agent import rollout as R
  R._clip = E._clip = fn


def count_decodes(rollout_module, decoded: dict) -> None:
  """Wraps the module's `_overview` and `_clip` (both engines') so that each call appends its task id to
  decoded[name]."""
  for name in ("_overview", "_clip"):
    decoded[name] = []
    inner = getattr(rollout_module, name)

    def counted(task, *args, _inner=inner, _name=name):
      decoded[_name].append(task.id)  # list.append is atomic: the pool's threads may call at once
      return _inner(task, *args)
    setattr(rollout_module, name, counted)
  set_clip(rollout_module._clip)


def rollout_record(trajs, events) -> dict:
  """Trajectories and events as JSON (floats as their exact repr, pixels as a hash of their bytes)."""
  # A "done" event carries the trajectory (compared below, log-probs within a bound): here its id and end.
  # "tokens" events are left out: how a turn's tokens split into device steps depends on when clips arrive,
  # which differs between runs (the turns' texts are in the "turn" events).
  show = lambda kind, info: f"{info.task.id}: {info.finish_reason}" if kind == "done" else str(info)
  return dict(events=[[kind, int(row), show(kind, info)] for kind, row, info in events if kind != "tokens"],
              trajs=[dict(id=t.task.id, ids=t.ids.tolist(), mask=t.response_mask.tolist(),
                          logprobs=t.logprobs.tolist(), pixel_shape=list(t.pixel_values.shape),
                          pixel_sha256=hashlib.sha256(t.pixel_values.tobytes()).hexdigest(),
                          grids=t.image_grid_thw.tolist(), calls=t.calls, answer=t.answer,
                          finish_reason=t.finish_reason, turns=t.turns) for t in trajs])


def rollout_main(argv):
  coordinator, n, pid, checkpoint, tasks_json, out_dir, engine = argv
  distributed.initialize(coordinator, int(n), int(pid))

  import jax

  import zoomer_jax
  from zoomer_jax.agent import rollout as R
  from zoomer_jax.parallel.mesh import make_mesh
  from zoomer_jax.text import build_tiny_tokenizer

  decoded = {}
  count_decodes(R, decoded)
  mesh = make_mesh((2, 2, 2))
  model = zoomer_jax.load_hf(checkpoint, mesh=mesh)
  tasks = [R.Task(**t) for t in json.load(open(tasks_json))]
  events = []
  with jax.set_mesh(mesh):
    trajs = run_rollout(engine, model, build_tiny_tokenizer(), tasks, jax.random.key(3),
                        on_event=lambda *e: events.append(e), script=rollout_script)
  record = dict(rollout_record(trajs, events), decoded={k: list(v) for k, v in decoded.items()},
                process_index=jax.process_index(), owned=R.owned_rows(len(tasks)))

  # A bug in one process's clip extraction (not a video error) must stop every process with the same error,
  # not leave the others waiting for it in a collective.
  def buggy_clip(task, *args, _inner=R._clip):
    if task.id == "t2":
      raise TypeError("simulated bug in the clip extraction")
    return _inner(task, *args)
  set_clip(buggy_clip)
  try:
    with jax.set_mesh(mesh):
      run_rollout(engine, model, build_tiny_tokenizer(), tasks, jax.random.key(3), script=rollout_script)
    record["fatal"] = None
  except Exception as e:  # noqa: BLE001 (the test checks which)
    record["fatal"] = [type(e).__name__, str(e)]
  with open(os.path.join(out_dir, f"rollout_{engine}{pid}.json"), "w") as f:
    json.dump(record, f)


QUEUE_QUESTIONS = ["What colour is the square? A. red B. blue", "Is there a square? A. yes B. no",
                   "Where? A. left B. right", "When?", "How many? A. one B. two", "Which way? A. up B. down"]
QUEUE_ANSWERS = {i: ["<answer>A</answer><|im_end|>"] for i in (0, 2, 3, 5)}  # rows 1 and 4 sampled


def queue_setup(video: str):
  """The joining rollout of `queue_main`: six one-task groups, one place in flight per replica."""
  import dataclasses
  from zoomer_jax.agent.engine import EngineConfig
  from zoomer_jax.agent.rollout import Task, cache_bound
  tasks = [Task(video, f"<image>\n{q}", "A", f"q{i}") for i, q in enumerate(QUEUE_QUESTIONS)]
  cfg = dataclasses.replace(rollout_config(), sampling=dataclasses.replace(rollout_config().sampling,
                                                                            max_new_tokens=8))
  cfg = dataclasses.replace(cfg, cache_size=cache_bound(cfg, 64))
  return tasks, cfg, EngineConfig(page_size=8, step_tokens=64, max_running=2)


def queue_script(row: int, rnd: int):
  turns = QUEUE_ANSWERS.get(row, [])
  return turns[rnd] if rnd < len(turns) else None


def queue_main(argv):
  """Two replicas of 4 chips, one per process, with tasks joining (`replicated_rollout(join=True)`): replica 0's
  first task (process 0) waits until every other task is done (process 1 says so through the distributed
  runtime's key-value store), so replica 1 must take every task still waiting, its own block's first, then replica
  0's."""
  coordinator, n, pid, checkpoint, video, out_dir = argv
  distributed.initialize(coordinator, int(n), int(pid))

  import jax

  import zoomer_jax
  from zoomer_jax.agent.replicas import replicated_rollout, spanning_replica
  from zoomer_jax.parallel.mesh import make_mesh
  from zoomer_jax.text import build_tiny_tokenizer

  tasks, cfg, engine = queue_setup(video)
  mesh = make_mesh((2, 1, 4))
  assert spanning_replica(mesh) is None
  model = zoomer_jax.load_hf(checkpoint, mesh=mesh)
  kv = distributed.kv_store()

  def script(row, rnd):
    if row == 0 and rnd == 0:
      kv.blocking_key_value_get("test/last_done", 300_000)
    return queue_script(row, rnd)

  events = []

  def on_event(kind, row, info):  # this process's rows only: process 1 sees every task but 0 end
    events.append((kind, row, info))
    if kind == "done" and len({r for k, r, _ in events if k == "done"} - {0}) == len(tasks) - 1:
      kv.key_value_set("test/last_done", "1")

  with jax.set_mesh(mesh):
    trajs = replicated_rollout(model, build_tiny_tokenizer(), tasks, cfg, jax.random.key(7), on_event=on_event,
                               script=script, engine=engine, join=True)
  record = dict(rollout_record(trajs, []), replicas=[t.replica for t in trajs], homes=[t.home for t in trajs],
                done_here=sorted(row for kind, row, _ in events if kind == "done"),
                done_order=[row for kind, row, _ in events if kind == "done"])
  record.update(_train_rows(trajs, mesh))
  with open(os.path.join(out_dir, f"queue{pid}.json"), "w") as f:
    json.dump(record, f)


def _unequal_batches(mc, mesh, rows, order, held, every, adv) -> list[list[str]]:
  """For each micro-batch of `order`: the leaves of the global batch built from `held` (each process's pixels
  only) that differ from one process's batch of the same trajectories with every pixel (`every`)."""
  import jax
  import numpy as np

  from zoomer_jax.train.batch import make_batch
  from zoomer_jax.train.grpo import example_of, training_batch

  out = []
  for i in range(0, len(order), rows):
    part = order[i:i + rows]
    got = distributed.to_host(training_batch(mc, [example_of(held[k], adv[k]) for k in part], mesh, rows=rows,
                                             token_bucket=16, image_bucket=4, pad_id=0))
    want = make_batch(mc, [example_of(every[k], adv[k]) for k in part], rows=rows, token_bucket=16,
                      image_bucket=4, pad_id=0)
    a, b = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    out.append([jax.tree_util.keystr(pa) for (pa, x), (_, y) in zip(a, b)
                if np.shape(x) != np.shape(y) or not np.array_equal(x, y)] if len(a) == len(b) else ["structure"])
  return out


def _train_rows(trajs, mesh) -> dict:
  """GRPO's training rows of a joining rollout's trajectories on `mesh` (2 rows, one per replica), each process
  holding only the pixels its own engine made (as with `pixels="own"`): the order (by `Trajectory.home`), bytes
  sent, the trajectories whose pixels the process ends with, and the leaves of each micro-batch that differ from
  one process's batch of the same trajectories with every pixel."""
  import dataclasses

  import jax

  from zoomer_jax.agent.replicas import replica_meshes
  from zoomer_jax.config_loader import load
  from zoomer_jax.model.config import ModelConfig
  from zoomer_jax.train import placement as PL

  mc, rows = ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model), 2
  maker = {r: int(sub.devices.flat[0].process_index) for r, sub in enumerate(replica_meshes(mesh))}
  mine = [t if maker[t.replica] == jax.process_index() else dataclasses.replace(t, pixel_values=None) for t in trajs]
  order = PL.place([t.home for t in mine], PL.home_replicas(mesh, mesh, rows))
  held, sent = PL.share_pixels(mine, order, mesh, mesh, rows)
  unequal = _unequal_batches(mc, mesh, rows, order, held, trajs, [0.5] * len(trajs))
  return dict(order=order, sent=sent, held=[k for k, t in enumerate(held) if t.pixel_values is not None],
              unequal=unequal)


PLACEMENT_REPLICAS = [0] * 9 + [1] * 3  # replica 0's groups kept 9 trajectories, replica 1's 3


def placement_trajectories():
  """The placement test's 12 trajectories (tiny tokenizer, 1-2 overview images and a zoom's frame each), made by
  `PLACEMENT_REPLICAS`; the same on every process (a seeded generator)."""
  import numpy as np

  from zoomer_jax.agent.rollout import Task, Trajectory
  from zoomer_jax.text import build_tiny_tokenizer
  from zoomer_jax.train.sft import encode_conversation
  tok, rng, out = build_tiny_tokenizer(), np.random.default_rng(5), []
  for k, replica in enumerate(PLACEMENT_REPLICAS):
    overview = 1 + k % 2
    imgs = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(overview + 1)]
    msgs = [{"role": "user", "content": "Frames: " + " <image>" * overview + f"\nWhich colour? {k}"},
            {"role": "assistant", "content": '<video_zoom>{"segment": [1, 3], "fps": 1}</video_zoom>'},
            {"role": "user", "content": "<tool_response>\n<frame0_time2.0s><image>\n</tool_response>"},
            {"role": "assistant", "content": "<answer>" + "B" * (1 + k % 3) + "</answer>"}]
    ex = encode_conversation(tok, msgs, imgs, max_pixels=56 * 56, min_pixels=28 * 28)
    out.append(Trajectory(task=Task("v.mp4", "q", "B", str(k)), ids=ex.ids, response_mask=ex.loss_mask.astype(np.int32),
                          logprobs=rng.normal(size=len(ex.ids)).astype(np.float32), pixel_values=ex.pixel_values,
                          image_grid_thw=ex.image_grid_thw, calls=[], answer="B", finish_reason="answer", rounds=2,
                          turns=[], replica=replica))
  return out


def placement_main(argv):
  """GRPO's training rows from trajectories whose pixels only their replica's process holds: writes
  OUT_DIR/placement{PROCESS_ID}.json (the order, bytes sent, which pixels the process ends with, and whether each
  micro-batch equals one process's batch of the same trajectories)."""
  coordinator, n, pid, out_dir = argv
  distributed.initialize(coordinator, int(n), int(pid))

  import dataclasses

  import jax
  import numpy as np

  from zoomer_jax.agent.replicas import replica_meshes
  from zoomer_jax.config_loader import load
  from zoomer_jax.model.config import ModelConfig
  from zoomer_jax.parallel.mesh import make_mesh
  from zoomer_jax.train import placement as PL

  mc = ModelConfig.from_config_dict(load("qwen25vl_tiny", []).model)
  mesh, rows = make_mesh((2, 4, 1)), 8  # grpo_tiny's: the rollout's replicas are its data axis
  every = placement_trajectories()
  maker = {r: int(sub.devices.flat[0].process_index) for r, sub in enumerate(replica_meshes(mesh))}
  me = jax.process_index()
  mine = [t if maker[t.replica] == me else dataclasses.replace(t, pixel_values=None) for t in every]
  order = PL.place([t.replica for t in mine], PL.home_replicas(mesh, mesh, rows))
  trajs, sent = PL.share_pixels(mine, order, mesh, mesh, rows)
  adv = np.linspace(-1.0, 1.0, len(every))
  equal = _unequal_batches(mc, mesh, rows, order, trajs, every, adv)
  record = dict(order=order, sent=sent, maker={str(k): v for k, v in maker.items()},
                homes=PL.home_replicas(mesh, mesh, rows), held=[k for k, t in enumerate(trajs) if t.pixel_values is not None],
                unequal=equal, pixel_bytes=[int(t.pixel_values.nbytes) for t in every])
  with open(os.path.join(out_dir, f"placement{pid}.json"), "w") as f:
    json.dump(record, f)


def main(argv):
  if len(argv) > 3 and argv[3] == "rollout":
    return rollout_main(argv[:3] + argv[4:])
  if len(argv) > 3 and argv[3] == "queue":
    return queue_main(argv[:3] + argv[4:])
  if len(argv) > 3 and argv[3] == "placement":
    return placement_main(argv[:3] + argv[4:])
  coordinator, n, pid, checkpoint, prompt_path, out_dir, *meshes = argv
  distributed.initialize(coordinator, int(n), int(pid))

  import jax
  import numpy as np

  import zoomer_jax
  from zoomer_jax.parallel.mesh import make_mesh

  info = dict(process_index=jax.process_index(), process_count=jax.process_count(),
              device_count=jax.device_count(), local_device_count=jax.local_device_count(), meshes={})
  prompt = dict(np.load(prompt_path))
  for ici in meshes:
    mesh = make_mesh(tuple(int(d) for d in ici.split(",")))
    model = zoomer_jax.load_hf(checkpoint, mesh=mesh)
    with jax.set_mesh(mesh):
      logits = model(**prompt)
    info["meshes"][ici] = dict(multi_process=mesh.is_multi_process,
                               logits_fully_addressable=logits.is_fully_addressable)
    logits = distributed.to_host(logits)
    if distributed.is_main_process():
      np.save(os.path.join(out_dir, f"logits_{ici}.npy"), logits)
    # Every process takes part in gathering the parameters; only process 0 writes files.
    zoomer_jax.export_hf(model, os.path.join(out_dir, f"export_{ici}"), max_shard_bytes=300_000)
  with open(os.path.join(out_dir, f"info{pid}.json"), "w") as f:
    json.dump(info, f)


if __name__ == "__main__":
  main(sys.argv[1:])
