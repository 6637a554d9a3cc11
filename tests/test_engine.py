"""The continuous rollout engine (`agent/engine.py`) against the lockstep one (`agent/rollout.py`): the same
trajectories (scripted and greedy, zooms, tool errors, a missing video), a GRPO group's prompt prefilled once with
the same results as unshared runs, and no compilation after warm-up over a rollout of other lengths."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import tolerances as tol
from zoomer_jax.agent import protocol as P
from zoomer_jax.agent.engine import EngineConfig, EngineStats, continuous_rollout
from zoomer_jax.agent.rollout import AgentConfig, Task, cache_bound, rollout
from zoomer_jax.config_loader import load
from zoomer_jax.sampling import SamplingParams
from zoomer_jax.sampling import burst as B
from zoomer_jax.sampling import ragged as R
from zoomer_jax.text import build_tiny_tokenizer

from test_agent import SMALL, model, video  # noqa: F401 (fixtures: the agent tests' tiny model and clip)


@pytest.fixture(scope="module")
def tok():
  return build_tiny_tokenizer()


def _config(temperature=0.0, max_new_tokens=48, **tool):
  return AgentConfig(tool=P.ToolConfig(**tool), sampling=SamplingParams(temperature=temperature,
                                                                        max_new_tokens=max_new_tokens),
                     decode_chunk=16, max_pixels=SMALL, min_pixels=SMALL, workers=2)


def _same(a, b, measure=None, name=""):
  """Trajectories equal as GRPO and eval read them; log-probs within fp32 rounding."""
  assert a.task == b.task
  assert a.ids.tolist() == b.ids.tolist(), (a.task.id, a.turns, b.turns)
  assert a.response_mask.tolist() == b.response_mask.tolist()
  assert (a.calls, a.answer, a.finish_reason, a.rounds, a.turns) == (b.calls, b.answer, b.finish_reason, b.rounds,
                                                                     b.turns)
  assert np.array_equal(a.pixel_values, b.pixel_values) and np.array_equal(a.image_grid_thw, b.image_grid_thw)
  diff = float(np.abs(a.logprobs - b.logprobs).max(initial=0.0))
  if measure is not None:
    measure(name, diff)
  assert diff <= tol.LOGPROB_FP32


SCRIPT = {
    0: ['<think>the overview is too coarse</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>',
        '<think>again</think><video_zoom>{"segment": [2, 4], "fps": </video_zoom>',
        '<think>the end</think><video_zoom>{"segment": [18, 25], "fps": 1}</video_zoom>',
        "<think>seen it</think><answer>B</answer><|im_end|>"],
    1: ['<video_zoom>{"segment": [1, 3], "fps": 1}</video_zoom>'],  # a zoom, then greedy turns
    3: ['<video_zoom>{"segment": [5, 9], "fps": 1}</video_zoom>', '<video_zoom>{"segment": [0, 2], "fps": 2}'],
}  # row 3's second turn is forced to the middle of a call, and greedy from there; row 4 is greedy throughout


def _script(table):
  return lambda row, rnd: table[row][rnd] if row in table and rnd < len(table[row]) else None


def test_trajectories_equal_the_lockstep_engines(model, tok, video, tmp_path, measure):
  """Scripted zooms, a malformed call, a clamped segment, a missing video and greedy turns: the same
  trajectories, and the same events per row."""
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "t0"),
           Task(video, "<image>\nIs there a square? A. yes B. no", "A", "t1"),
           Task(str(tmp_path / "missing.mp4"), "<image>\nAnything?", "A", "t2"),
           Task(video, "<image>\nWhere? A. left B. right", "A", "t3"),
           Task(video, "<image>\nWhen?", "A", "t4")]
  cfg = _config(max_generation_round=4)
  ev_a, ev_b = [], []
  want = rollout(model, tok, tasks, cfg, jax.random.key(3), on_event=lambda *e: ev_a.append(e),
                 script=_script(SCRIPT))
  got = continuous_rollout(model, tok, tasks, cfg, jax.random.key(3), on_event=lambda *e: ev_b.append(e),
                           script=_script(SCRIPT), engine=EngineConfig(page_size=8, step_tokens=64))
  assert (got[0].finish_reason, got[2].finish_reason) == ("answer", "video_error")
  assert [len(t.calls) for t in got] == [3, 1, 1, 1, 0] and got[1].rounds == got[3].rounds == 2  # greedy after zooms
  for a, b in zip(want, got):
    _same(a, b, measure, f"{a.task.id}_logprob_diff")
  per_row = lambda ev: {i: [(k, str(x)) for k, j, x in ev if j == i and k not in ("tokens", "done")]
                         for i in range(len(tasks))}
  assert per_row(ev_a) == per_row(ev_b)
  # The continuous engine also reports each step's sampled ids ("tokens": per turn they decode to its text) and
  # each trajectory as it ends ("done", once per row, last).
  for i, traj in enumerate(got):
    ids, turns = [], []
    for k, j, x in ev_b:
      if j == i and k == "tokens":
        ids += x
      elif j == i and k == "turn":
        turns.append(tok.decode(ids, skip_special_tokens=True))
        ids = []
    assert turns == traj.turns and not ids
    mine = [(k, x) for k, j, x in ev_b if j == i]
    assert mine[-1][0] == "done" and mine[-1][1] is traj and [k for k, _ in mine].count("done") == 1


GROUP_SCRIPT = {
    0: ['<video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>', "<answer>A</answer><|im_end|>"],
    2: ['<think>look</think><video_zoom>{"segment": [6, 7], "fps": 3}</video_zoom>'],  # then greedy
    3: ["<answer>B</answer><|im_end|>"],
    4: ['<video_zoom>{"segment": [0, 20], "fps": 0.5}</video_zoom>', '<video_zoom>{"segment": [1, 2], "fps": 1}'],
}  # rows 1 and 5 greedy throughout


JOIN_SCRIPT = {
    0: ['<video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>', '<video_zoom>{"segment": [5, 9], "fps": 1}'
        '</video_zoom>', "<answer>B</answer><|im_end|>"],
    2: ["<answer>A</answer><|im_end|>"],
}  # rows 1 and 4 greedy throughout; row 3's video is missing


def test_tasks_joining_a_running_engine_get_a_fresh_runs_trajectories(model, tok, video, tmp_path, measure):
  """Serving's per-step admission (`admit`): tasks join one at a time while the first runs, each is reported
  ("done") as it ends (one that joined before the long first), a missing video at once; the trajectories equal a run
  that had every task from the start, and no more than `max_running` are ever in flight."""
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "j0"),
           Task(video, "<image>\nIs there a square? A. yes B. no", "A", "j1"),
           Task(video, "<image>\nWhere? A. left B. right", "A", "j2"),
           Task(str(tmp_path / "missing.mp4"), "<image>\nAnything?", "A", "j3"),
           Task(video, "<image>\nWhen?", "A", "j4")]
  cfg = dataclasses.replace(_config(max_generation_round=3), cache_size=0)
  cfg = dataclasses.replace(cfg, cache_size=cache_bound(cfg, 128))
  engine = EngineConfig(page_size=8, step_tokens=64, max_running=2)
  want = continuous_rollout(model, tok, tasks, cfg, jax.random.key(5), script=_script(JOIN_SCRIPT), engine=engine)
  polls, later, done = [], list(tasks[1:]), []

  def admit(free):
    polls.append(free)
    out = later[:min(free, 1)] if len(polls) > 2 else []  # from the third poll on, one task per poll
    del later[:len(out)]
    return out

  def on_event(kind, i, info):
    if kind == "done":
      done.append((i, info))

  got = continuous_rollout(model, tok, tasks[:1], cfg, jax.random.key(5), on_event=on_event,
                           script=_script(JOIN_SCRIPT), engine=engine, admit=admit)
  assert len(got) == len(tasks) and not later and 0 <= min(polls) and max(polls) <= engine.max_running
  for k, (a, b) in enumerate(zip(want, got)):
    _same(a, b, measure, f"row{k}_joined_vs_from_the_start")
  order = [i for i, _ in done]
  assert sorted(order) == list(range(len(tasks))) and order.index(1) < order.index(0)  # no batch barrier
  assert order.index(3) < order.index(4) and got[3].finish_reason == "video_error"
  for i, traj in done:
    assert traj.ids.tolist() == got[i].ids.tolist() and traj.finish_reason == got[i].finish_reason
  with pytest.raises(ValueError, match="max_running > 0 and cfg.cache_size > 0"):
    continuous_rollout(model, tok, tasks[:1], _config(), engine=engine, admit=admit)


def test_a_groups_prompt_is_prefilled_once_with_the_results_of_unshared_runs(model, tok, video, measure):
  """Two GRPO groups of three (tasks repeated, as `train.grpo` repeats them): shared, each prompt is prefilled
  once and its pages forked; the trajectories equal unshared runs and the lockstep engine. At most four
  trajectories in flight, so the second group waits for the first to free pages."""
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "g0")] * 3 + \
      [Task(video, "<image>\nIs there a square? A. yes B. no", "A", "g1")] * 3
  cfg = _config(max_generation_round=3)
  runs = {}
  for name, engine in (("shared", EngineConfig(page_size=8, max_running=4)),
                       ("unshared", EngineConfig(page_size=8, share_prompts=False))):
    stats = EngineStats()
    runs[name] = (continuous_rollout(model, tok, tasks, cfg, jax.random.key(5), script=_script(GROUP_SCRIPT),
                                     engine=engine, stats=stats), stats)
  want = rollout(model, tok, tasks, cfg, jax.random.key(5), script=_script(GROUP_SCRIPT))
  prompt = [int(np.argmax(t.response_mask)) for t in want]  # the prompt ends at the first model token
  assert runs["shared"][1].prefill_tokens == prompt[0] + prompt[3]
  assert runs["unshared"][1].prefill_tokens == sum(prompt)
  assert [len(t.calls) for t in want] == [1, 0, 1, 0, 1, 0]
  for k, (a, b, c) in enumerate(zip(want, runs["shared"][0], runs["unshared"][0])):
    _same(a, b, measure, f"row{k}_shared_vs_lockstep")
    _same(b, c, measure, f"row{k}_shared_vs_unshared")


def test_no_compilation_after_warm_up(model, tok, video):
  """Every step's shape is bucketed: a long rollout compiles one program per distinct shape, a handful for many
  steps, and a second rollout with other turn lengths, zooms and frame counts compiles only the shapes the first
  did not meet (which steps coincide depends on when clips arrive, so a few may be new)."""
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue"), Task(video, "<image>\nWhere?")] * 2
  first = {0: ['<think>a</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>',
               '<think>b</think><video_zoom>{"segment": [5, 8], "fps": 1}</video_zoom>'],
           1: ['<think>x</think><video_zoom>{"segment": [0, 1], "fps": 4}</video_zoom>'],
           2: ['<video_zoom>{"segment": [3, 9], "fps": 2}</video_zoom>']}
  second = {0: ['<think>other words here</think><video_zoom>{"segment": [10, 11.5], "fps": 2}</video_zoom>',
                '<think>z</think><video_zoom>{"segment": [3, 6], "fps": 1.5}</video_zoom>'],
            1: ['<video_zoom>{"segment": [4, 5], "fps": 3}</video_zoom>'],
            3: ['<video_zoom>{"segment": [6, 7], "fps": 2}</video_zoom>']}
  cfg = _config(max_generation_round=3)
  engine = EngineConfig(page_size=8, step_tokens=64)
  seen, grown = set(), []
  R.ragged_program.clear_cache()  # programs of earlier tests would hide the first rollout's compiles
  B.burst_program.clear_cache()
  compiled = lambda: R.compiled_programs() + B.compiled_programs()
  for script in (first, second):
    before, stats = compiled(), EngineStats()
    continuous_rollout(model, tok, tasks, cfg, jax.random.key(1), script=_script(script), engine=engine, stats=stats)
    grown.append((compiled() - before, len(stats.shapes - seen), stats.decode_tokens, stats.bursts))
    seen |= stats.shapes
  (c1, new1, decoded1, bursts1), (c2, new2, _, _) = grown
  assert c1 == new1 and c2 == new2, grown  # one program per shape (steps and bursts), nothing else recompiles
  assert decoded1 >= 200 and bursts1 >= 5 and len(seen) <= 10, grown


def test_grpo_generates_with_the_configured_engine(model, tok, video):
  """`rollout.engine` picks the engine GRPO generates with: the continuous one gives the lockstep one's greedy
  trajectories (whose batches are padded to batch_size); an unknown name is refused."""
  from zoomer_jax.train import grpo
  tasks = [Task(video, "<image>\nWhat colour?", "A", "a")] * 2 + [Task(video, "<image>\nWhere?", "B", "b")]
  cfg = _config(max_generation_round=2, max_new_tokens=16)
  want = grpo.generate(model, tok, tasks, cfg, jax.random.key(2), 2, "lockstep")
  got = grpo.generate(model, tok, tasks, cfg, jax.random.key(2), 2, "continuous", EngineConfig(page_size=8))
  for a, b in zip(want, got):
    _same(a, b)
  with pytest.raises(ValueError, match="rollout.engine 'paged' is not one of"):
    grpo.generate(model, tok, tasks, cfg, jax.random.key(2), 2, "paged")


def test_grpo_runs_max_running_trajectories_in_flight_else_batch_size(monkeypatch, tok):
  """`rollout.max_running` (EngineConfig.max_running) sets the continuous engine's trajectories in flight; 0
  leaves it at `rollout.batch_size`, the lockstep engine's batch."""
  from zoomer_jax.train import grpo
  seen = []
  monkeypatch.setattr(grpo, "replicated_rollout", lambda *a, engine, **k: seen.append(engine.max_running) or [])
  for engine_cfg in (EngineConfig(page_size=8), EngineConfig(page_size=8, max_running=24)):
    grpo.generate(None, tok, [], _config(), jax.random.key(0), 8, "continuous", engine_cfg)
  cfg = load("grpo_tiny")
  assert seen == [8, 24] and grpo.engine_config(cfg.rollout).max_running == cfg.rollout.max_running == 0


def test_decode_bursts_give_the_trajectories_of_one_token_steps(model, tok, video, measure):
  """Bursts of 8 against one token per step: scripted turns that end mid-burst on a stop string, greedy turns
  that end on the turn's budget (13 tokens, not a multiple of 8), zooms whose chunks interrupt other rows' bursts,
  a shared prompt's copy on write; the same trajectories, and every page free again at the end."""
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "g0")] * 3 + \
      [Task(video, "<image>\nWhere? A. left B. right", "A", "t1")]
  table = {0: ['<think>a</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>', "<answer>B</answer>"],
           1: ['<video_zoom>{"segment": [0, 3], "fps": 1}</video_zoom>'],
           3: ["<think>longer thinking here</think><answer>A</answer><|im_end|>"]}
  cfg = _config(max_generation_round=3, max_new_tokens=13)
  runs = {}
  for k in (1, 8):
    stats = EngineStats()
    runs[k] = (continuous_rollout(model, tok, tasks, cfg, jax.random.key(4), script=_script(table),
                                  engine=EngineConfig(page_size=8, decode_burst=k), stats=stats), stats)
  (one, s1), (burst, s8) = runs[1], runs[8]
  assert s1.bursts == 0 and s8.bursts > 0 and s8.steps < s1.steps
  assert s1.pages_leaked == s8.pages_leaked == 0
  assert s8.decode_tokens == s1.decode_tokens and s8.prefills == s1.prefills == 2
  turns = [len(tok.encode(t)) for traj in one for t in traj.turns]
  assert 13 in turns and any(n % 8 and n != 13 for n in turns)  # turns end on the budget and mid-burst
  for k, (a, b) in enumerate(zip(one, burst)):
    _same(a, b, measure, f"row{k}_burst_vs_one_token")


def test_sampled_trajectories_do_not_depend_on_the_schedule(model, tok, video, measure):
  """Sampling at temperature 1: every token's key folds in its trajectory and index, so the trajectories are the
  same whichever sequences share a device step - one token per step or bursts of 8, every task in flight or two
  at a time - and a different rollout key changes them."""
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "g0")] * 3 + \
      [Task(video, "<image>\nWhere? A. left B. right", "A", "t1")]
  table = {0: ['<think>a</think><video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>'],
           3: ['<video_zoom>{"segment": [0, 3], "fps": 1}</video_zoom>']}  # zooms: steps depend on clip timing
  cfg = _config(temperature=1.0, max_generation_round=3, max_new_tokens=12)
  run = lambda key, **engine: continuous_rollout(model, tok, tasks, cfg, jax.random.key(key), script=_script(table),
                                                 engine=EngineConfig(page_size=8, **engine))
  base = run(6, decode_burst=1)
  for name, other in (("burst8", run(6, decode_burst=8)), ("two_running", run(6, decode_burst=8, max_running=2))):
    for k, (a, b) in enumerate(zip(base, other)):
      _same(a, b, measure, f"row{k}_{name}")
  assert [t.ids.tolist() for t in run(7, decode_burst=8)] != [t.ids.tolist() for t in base]
  assert len({tuple(t.ids.tolist()) for t in base[:3]}) > 1  # a group's samples differ from each other


def test_a_pool_too_small_for_every_trajectory_preempts_and_recomputes(model, tok, video, measure):
  """The smallest pool the engine accepts (one trajectory at its longest plus a page per sample of a group), three
  GRPO groups of three with zooms, all in flight: sequences short of pages preempt later ones, which compute their
  transcript again (overview and clips; after the pages of their group's prompt that others still hold) and go
  on. The trajectories and log-probs are the lockstep engine's, each group's prompt is still counted as
  prefilled once, and every page is free at the end."""
  tasks = [Task(video, "<image>\nWhat colour is the square? A. red B. blue", "B", "g0")] * 3 + \
      [Task(video, "<image>\nIs there a square? A. yes B. no", "A", "g1")] * 3 + \
      [Task(video, "<image>\nWhere? A. left B. right", "A", "g2")] * 3
  cfg = _config(max_generation_round=3)
  with pytest.raises(ValueError, match=r"pool_pages=1 \(EngineConfig; rollout.pool_pages .* at least \d+$") as err:
    continuous_rollout(model, tok, tasks, cfg, engine=EngineConfig(page_size=8, pool_pages=1))
  want = rollout(model, tok, tasks, cfg, jax.random.key(5), script=_script(GROUP_SCRIPT))
  # Pages of 8 keep a prompt's shared pages past its images (the rest computed from its text), pages of 128 cut
  # before its first image (the overview computed again).
  for burst, page_size in ((1, 8), (8, 8), (8, 128)):
    if page_size != 8:
      with pytest.raises(ValueError, match="at least") as err:
        continuous_rollout(model, tok, tasks, cfg, engine=EngineConfig(page_size=page_size, pool_pages=1))
    stats = EngineStats()
    got = continuous_rollout(model, tok, tasks, cfg, jax.random.key(5), script=_script(GROUP_SCRIPT), stats=stats,
                             engine=EngineConfig(page_size=page_size, decode_burst=burst,
                                                 pool_pages=int(err.value.args[0].rsplit(" ", 1)[1])))
    assert stats.preemptions > 0 and stats.recompute_tokens > 0 and stats.pages_leaked == 0, stats
    assert stats.prefills == 3 and stats.prefix_kept_tokens > 0, stats  # kept pages of the group's prompt
    for k, (a, b) in enumerate(zip(want, got)):
      _same(a, b, measure, f"row{k}_burst{burst}_pages{page_size}_preempted_vs_lockstep")


REPLICA_SCRIPT = {
    0: ['<video_zoom>{"segment": [2, 4], "fps": 2}</video_zoom>', "<answer>A</answer><|im_end|>"],
    5: ['<think>look</think><video_zoom>{"segment": [6, 7], "fps": 3}</video_zoom>'],  # then sampled
    8: ['<video_zoom>{"segment": [0, 20], "fps": 0.5}</video_zoom>', '<video_zoom>{"segment": [1, 2], "fps": 1}'],
}  # the other rows sampled throughout (row 3's video is missing)


def test_one_engine_per_data_parallel_replica_gives_one_engines_trajectories(model, tok, video, tmp_path, measure):
  """GRPO-shaped groups on a (data 4, tensor 2) mesh: each replica runs its own engine on its own two chips, its
  share of the groups, its own pool; the sampled trajectories, log-probs and events per row are those of one
  engine over every task on one device, and each group's prompt is still prefilled once."""
  import zoomer_jax
  from zoomer_jax.agent import replicas as RP
  from zoomer_jax.parallel.mesh import make_mesh

  questions = ["<image>\nWhat colour is the square? A. red B. blue", "<image>\nIs it moving? A. yes B. no",
               "<image>\nWhere? A. left B. right"]
  tasks = [Task(video, q, "A", f"g{g}s{k}") for g, q in enumerate(questions) for k in range(3)]
  tasks.insert(3, Task(str(tmp_path / "missing.mp4"), "<image>\nAnything?", "A", "missing"))
  assert RP.split_groups(RP.task_groups(tasks), 4) == [[0, 1, 2], [3], [4, 5, 6], [7, 8, 9]]
  cfg = _config(temperature=1.0)
  engine = EngineConfig(page_size=8, step_tokens=64, max_running=8)
  ev_a, ev_b = [], []
  want = continuous_rollout(model, tok, tasks, cfg, jax.random.key(5), on_event=lambda *e: ev_a.append(e),
                            script=_script(REPLICA_SCRIPT), engine=engine)
  mesh = make_mesh((4, 1, 2))
  sharded = zoomer_jax.load_hf(zoomer_jax.export_hf(model, tmp_path / "m"), mesh=mesh)
  stats = EngineStats()
  with jax.set_mesh(mesh):
    got = RP.replicated_rollout(sharded, tok, tasks, cfg, jax.random.key(5), on_event=lambda *e: ev_b.append(e),
                                script=_script(REPLICA_SCRIPT), engine=engine, stats=stats)
  assert [t.finish_reason == "video_error" for t in got] == [k == 3 for k in range(len(tasks))]
  assert all(len(got[i].calls) >= 1 for i in (0, 5, 8))
  assert [t.replica for t in got] == [0, 0, 0, 1, 2, 2, 2, 3, 3, 3] and {t.replica for t in want} == {-1}
  for a, b in zip(want, got):
    _same(a, b, measure, f"{a.task.id}_replica_logprob_diff")
  per_row = lambda ev: {i: [(k, str(x)) for k, j, x in ev if j == i and k not in ("tokens", "done")]
                         for i in range(len(tasks))}
  assert per_row(ev_a) == per_row(ev_b)
  assert [j for k, j, _ in ev_b if k == "done"].count(4) == 1
  # Four engines ran (the missing video's read its overview only), each group's prompt prefilled once.
  assert (stats.engines, stats.prefills, stats.pages_leaked) == (4, 3, 0)

  # A replica's weights are the sharded model's own buffers on its own two chips.
  sub = RP.replica_meshes(mesh)[2]
  view = RP.replica_model(sharded, sub)
  for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(view, nnx.Param))):
    assert b.sharding.mesh == sub and b.sharding.spec == a.sharding.spec
    mine = {s.device: s.data.unsafe_buffer_pointer() for s in a.addressable_shards}
    assert {s.device: s.data.unsafe_buffer_pointer() for s in b.addressable_shards} == {
        d: mine[d] for d in sub.devices.flat}


def test_replica_engines_take_their_own_waiting_tasks_then_the_nearest_blocks(model, tok, video, tmp_path, measure):
  """Joining (`join=True`) on two replicas of one process: replica 0's first task is held (its script waits until
  every other task is done), so replica 1 runs its own block's waiting tasks first, then takes replica 0's instead
  of leaving them to it; every trajectory (sampled) equals one engine's over every task."""
  import threading
  import zoomer_jax
  from zoomer_jax.agent import replicas as RP
  from zoomer_jax.parallel.mesh import make_mesh

  questions = ["What colour is the square? A. red B. blue", "Is there a square? A. yes B. no",
               "Where? A. left B. right", "When?", "How many? A. one B. two", "Which way? A. up B. down"]
  tasks = [Task(video, f"<image>\n{q}", "A", f"q{i}") for i, q in enumerate(questions)]
  assert RP.split_groups(RP.task_groups(tasks), 2) == [[0, 1, 2], [3, 4, 5]]
  cfg = dataclasses.replace(_config(temperature=1.0, max_new_tokens=8, max_generation_round=2), cache_size=0)
  cfg = dataclasses.replace(cfg, cache_size=cache_bound(cfg, 64))
  engine = EngineConfig(page_size=8, step_tokens=64, max_running=2)  # one task in flight per replica
  answer = {i: ["<answer>A</answer><|im_end|>"] for i in (0, 2, 3, 5)}  # rows 1 and 4 sampled
  want = continuous_rollout(model, tok, tasks, cfg, jax.random.key(7), script=_script(answer), engine=engine)
  last_done = threading.Event()

  def script(row, rnd):
    if row == 0 and rnd == 0:
      assert last_done.wait(timeout=300), "the other replica never finished the waiting tasks"
    return _script(answer)(row, rnd)

  done, order = set(), []

  def on_event(kind, i, info):
    if kind == "done":
      done.add(i)
      order.append(i)
      if len(done - {0}) == len(tasks) - 1:
        last_done.set()

  mesh = make_mesh((2, 1, 4))
  sharded = zoomer_jax.load_hf(zoomer_jax.export_hf(model, tmp_path / "m"), mesh=mesh)
  stats = EngineStats()
  with jax.set_mesh(mesh):
    got = RP.replicated_rollout(sharded, tok, tasks, cfg, jax.random.key(7), on_event=on_event, script=script,
                                engine=engine, stats=stats, join=True)
  assert [t.replica for t in got] == [0, 1, 1, 1, 1, 1]  # rows 1 and 2 were replica 0's block
  assert [t.home for t in got] == [0, 0, 0, 1, 1, 1] and order == [3, 4, 5, 1, 2, 0]  # its own block first
  assert [t.task.id for t in got] == [t.id for t in tasks] and stats.pages_leaked == 0
  for a, b in zip(want, got):
    _same(a, b, measure, f"{a.task.id}_taken_from_the_queue")


def test_waiting_groups_go_to_their_own_block_first_then_the_nearest_looking_back_first():
  from zoomer_jax.agent.replicas import _Waiting
  blocks = [[[0]], [[1, 2], [3]], [], [[4]], [[5], [6]]]
  w = _Waiting(blocks, shared=False)
  assert w.smallest == 1
  assert [w.take(1), w.take(1)] == [[1, 2], [3]]  # its own block, in order
  assert w.take(1) == [0]  # then block 0 (distance 1, before it) ahead of block 2 (empty) and 3
  assert w.take(2) == [4]  # block 2 is empty: blocks 1 and 3 are as near; 1 is empty, so 3
  assert [w.take(0), w.take(0), w.take(0)] == [[5], [6], None]  # the farthest, then nothing anywhere
  assert w._empty == [True] * 5  # every counter past its end: no more round trips


def test_replica_engines_refuse_weights_split_over_the_data_axis():
  from jax.sharding import NamedSharding, PartitionSpec
  from zoomer_jax.agent import replicas as RP
  from zoomer_jax.parallel.mesh import make_mesh

  mesh = make_mesh((4, 1, 2))
  layer = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  layer.kernel.value = jax.device_put(layer.kernel.value, NamedSharding(mesh, PartitionSpec("data", "tensor")))
  with pytest.raises(ValueError, match=r"kernel.*split over the rollout mesh's data axis"):
    RP.replica_model(layer, RP.replica_meshes(mesh)[0])


def test_replicas_that_span_processes_fall_back_to_one_engine_with_a_warning(monkeypatch, model, tok, video,
                                                                             tmp_path):
  """A rollout mesh whose replicas are not each on one process (simulated: `spanning_replica` says so) runs one
  engine over the whole mesh, and says why."""
  import zoomer_jax
  from zoomer_jax.agent import replicas as RP
  from zoomer_jax.parallel.mesh import make_mesh

  mesh = make_mesh((4, 1, 2))
  sharded = zoomer_jax.load_hf(zoomer_jax.export_hf(model, tmp_path / "m"), mesh=mesh)
  assert RP.replica_engines(sharded) == 4 and RP.replica_engines(model) == 1
  monkeypatch.setattr(RP, "spanning_replica", lambda m: "replica 0 spans processes [0, 1]")
  assert RP.replica_engines(sharded) == 1
  stats = EngineStats()
  tasks = [Task(video, "<image>\nWhat colour?", "A", "a"), Task(video, "<image>\nWhere?", "B", "b")]
  with jax.set_mesh(mesh), pytest.warns(UserWarning, match="one rollout engine over the whole mesh: replica 0"):
    got = RP.replicated_rollout(sharded, tok, tasks, _config(max_new_tokens=8), jax.random.key(1),
                                engine=EngineConfig(page_size=8), stats=stats)
  assert stats.engines == 1 and stats.prefills == 2 and [t.task.id for t in got] == ["a", "b"]
