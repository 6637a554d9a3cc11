"""Whole training jobs on the 8-device mesh: SFT and GRPO steps, SIGTERM, resume = uninterrupted run."""

import json
import os
import signal
import threading
import types

import jax
import numpy as np
import pytest
from train_data import write_rl_records, write_sft_records

from zoomer_jax.__main__ import main
from zoomer_jax.config_loader import load
from zoomer_jax.train import grpo
from zoomer_jax.train.metrics import MetricWriter, read_metrics
from zoomer_jax.train.trainer import Preempted

SMALL = ["--config.model.text.num_hidden_layers=1", "--config.model.vision.depth=2",
         "--config.model.vision.fullatt_block_indexes=(1,)"]


def sft_config(data, workdir, steps=4):
  return load("sft_tiny", SMALL + [f"--config.data.train_files=('{data}',)", f"--config.workdir={workdir}",
                                   f"--config.train.total_steps={steps}", "--config.data.batch_size=2",
                                   "--config.data.micro_batch_size=1", "--config.trainer.save_freq=3",
                                   "--config.trainer.progress=False"])


def grpo_config(data, workdir, steps=3):
  return load("grpo_tiny", SMALL + [
      f"--config.data.train_files=('{data}',)", f"--config.workdir={workdir}", f"--config.trainer.total_steps={steps}",
      "--config.data.train_batch_size=2", "--config.rollout.n=2", "--config.rollout.response_length=8",
      "--config.rollout.max_generation_round=2", "--config.rollout.batch_size=4", "--config.rollout.temperature=1.0",
      "--config.actor.ppo_mini_batch_size=2", "--config.actor.ppo_micro_batch_size=2",
      "--config.algorithm.rejection_sample=False", "--config.trainer.save_freq=5", "--config.trainer.progress=False",
      f"--config.data.val_files=('{data}',)", "--config.trainer.test_freq=3"])


def sigterm_after(monkeypatch, step: int):
  """Delivers a real SIGTERM to this process's main thread right after the metrics of `step` are written.
  To the main thread, not the process: pytest's process holds the native threads of every earlier test, and a
  process-directed signal may land on any of them, in the middle of a system call."""
  write = MetricWriter.write

  def write_then_signal(self, s, metrics):
    write(self, s, metrics)
    if s == step:
      signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
  monkeypatch.setattr(MetricWriter, "write", write_then_signal)


@pytest.fixture
def keep_sigterm_handler():
  old = signal.getsignal(signal.SIGTERM)
  yield
  signal.signal(signal.SIGTERM, old)


def _losses(workdir, key="loss"):
  return {row["step"]: row[key] for row in read_metrics(workdir)}


def _saved_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.mark.slow
def test_sft_sigterm_saves_and_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, keep_sigterm_handler):
  from zoomer_jax.train.sft import run_sft
  data = write_sft_records(str(tmp_path / "data"), 8)
  run_sft(sft_config(data, tmp_path / "a"))
  full = _losses(tmp_path / "a")
  assert sorted(full) == [1, 2, 3, 4] and full[4] < full[1]  # it learns
  assert _saved_steps(tmp_path / "a") == [3, 4]  # every save_freq steps and at the end

  with monkeypatch.context() as m:
    sigterm_after(m, 2)
    with pytest.raises(Preempted, match="after step 2"):
      run_sft(sft_config(data, tmp_path / "b"))
  assert _saved_steps(tmp_path / "b") == [2]  # saved on SIGTERM although save_freq is 3
  run_sft(sft_config(data, tmp_path / "b"))  # the same command again resumes
  resumed = _losses(tmp_path / "b")
  assert sorted(resumed) == [1, 2, 3, 4]  # each step logged once
  for s in (1, 2, 3, 4):  # params, Adam moments, lr schedule and data position all restored exactly
    assert resumed[s] == full[s], (s, resumed[s], full[s])


def test_sft_with_each_rows_frames_split_over_its_chips_matches_whole_rows(tmp_path, measure):
  """SFT under the context-parallel rules on a (1, 4, 2) mesh: every row's images are cut into 2 pieces
  (`rules.vision_pieces`), each encoded on one of the row's chips, the vision tower training. Losses and gradient
  norms equal the same job's with the tower's heads split over those chips instead (the rows whole)."""
  import tolerances as tol
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES, vision_pieces
  from zoomer_jax.parallel.mesh import make_mesh
  from zoomer_jax.train.sft import run_sft
  data = write_sft_records(str(tmp_path / "data"), 8)
  old = tuple(r for r in CONTEXT_PARALLEL if not r[0].startswith("vision")) + tuple(DEFAULT_RULES)
  runs = {}
  for name, rules in (("pieces", CONTEXT_PARALLEL + tuple(DEFAULT_RULES)), ("whole", old)):
    cfg = sft_config(data, tmp_path / name, steps=2)
    cfg.mesh.ici = (1, 4, 2)
    cfg.data.batch_size = cfg.data.micro_batch_size = 4
    cfg.mesh.rules = rules
    assert vision_pieces(make_mesh(cfg.mesh.ici), rules) == (2 if name == "pieces" else 1)
    assert not cfg.train.freeze_vision_tower
    run_sft(cfg)
    runs[name] = (_losses(tmp_path / name), _losses(tmp_path / name, "grad_norm"))
  for key, got, want in zip(("loss", "grad_norm"), runs["pieces"], runs["whole"]):
    assert sorted(got) == [1, 2]
    measure(f"{key}_rel", max(abs(got[s] - want[s]) / abs(want[s]) for s in got))
    for s in got:
      assert abs(got[s] - want[s]) <= tol.LAYOUT_FP32_REL * abs(want[s]), (s, got[s], want[s])


@pytest.mark.slow
def test_grpo_steps_on_the_mesh_and_exact_resume(tmp_path, monkeypatch, keep_sigterm_handler):
  data = write_rl_records(str(tmp_path / "data"), 4)
  stats = grpo.run_grpo(grpo_config(data, tmp_path / "a"))
  rows = read_metrics(tmp_path / "a")
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("reward/mean", "acc/mean", "reward/format", "tool_calls/mean", "rounds/1_ratio", "actor/pg_clipfrac",
              "actor/kl_loss", "actor/entropy", "grad_norm", "tokens_per_s", "frames/mean"):
    assert key in stats and all(np.isfinite(r[key]) for r in rows), key
  assert all(r["actor/kl_loss"] >= 0 for r in rows)
  # The rollout mesh (data 8) ran one engine per replica that had a group (2 groups of 2 samples), each group's
  # prompt prefilled once.
  assert all(r["rollout/engines_per_process"] == 2 for r in rows), [r["rollout/engines_per_process"] for r in rows]
  assert all(r["rollout/taken_from_other_blocks"] == 0 for r in rows)  # one group per busy replica: none waited
  assert all(r["rollout/prefills"] == 2 * r["dynamic_sampling/gen_batches"] for r in rows)
  # One update per RL step (2 micro-batches accumulated): at step 1 the policy is the reference and the old
  # policy, so KL ~ 0, every ratio ~ 1 and nothing is clipped; later steps move away.
  assert rows[0]["actor/kl_loss"] < 1e-6 and abs(rows[0]["actor/ratio_mean"] - 1) < 1e-5
  assert rows[0]["actor/pg_clipfrac"] == 0 and rows[2]["actor/kl_loss"] > 1e-6
  assert "val/acc" not in rows[1] and 0 <= rows[2]["val/acc"] <= 1  # validated every test_freq steps
  assert len(open(tmp_path / "a" / "validation" / "val_3.jsonl").readlines()) == 4
  cfg = json.load(open(tmp_path / "a" / "config.json"))
  assert cfg["mesh"]["ici"] == [2, -1, 1]  # the tiny config's 8-device (data 2 x fsdp 4) mesh

  with monkeypatch.context() as m:
    sigterm_after(m, 1)
    with pytest.raises(Preempted):
      grpo.run_grpo(grpo_config(data, tmp_path / "b"))
  grpo.run_grpo(grpo_config(data, tmp_path / "b"))
  full, resumed = _losses(tmp_path / "a"), _losses(tmp_path / "b")
  assert resumed == full  # rollouts, rewards and updates after the resume are the uninterrupted run's
  assert _losses(tmp_path / "b", "response_length/mean") == _losses(tmp_path / "a", "response_length/mean")


def test_grpo_log_probs_of_several_micro_batches_in_one_forward(tmp_path):
  """`actor.logprob_micro_batch_size` = 2 micro-batches: the old and reference log-probs of both come from one
  forward (micro-batch j's row r at row 2r + j) and go back to their own rows and lengths. At step 1 the policy is
  the old and the reference one, so a trajectory given another's log-probs would show as a ratio off 1 or a KL
  above 0; the step's loss is the one-forward-per-micro-batch run's."""
  data = write_rl_records(str(tmp_path / "data"), 4)
  losses = {}
  for lp in (0, 4):
    cfg = grpo_config(data, tmp_path / f"lp{lp}", steps=1)
    cfg.actor.logprob_micro_batch_size = lp
    cfg.trainer.test_freq = 0
    grpo.run_grpo(cfg)
    row = read_metrics(tmp_path / f"lp{lp}")[0]
    assert abs(row["actor/ratio_mean"] - 1) < 1e-5 and row["actor/kl_loss"] < 1e-6, (lp, row)
    losses[lp] = row["actor/loss"]
  np.testing.assert_allclose(losses[4], losses[0], rtol=1e-5)
  bad = grpo_config(data, tmp_path / "bad", steps=1)
  bad.actor.logprob_micro_batch_size = 3
  with pytest.raises(ValueError, match="logprob_micro_batch_size 3 is not a positive multiple"):
    grpo.run_grpo(bad)


def _fake_traj(task, turns, frames):
  return types.SimpleNamespace(task=task, turns=turns, calls=[{"frames": frames}] if frames else [], n_frames=4,
                               rounds=len(turns), finish_reason="answer", response_mask=np.ones(3), ids=np.zeros(3))


def test_dynamic_sampling_keeps_generating_until_the_batch_is_full(monkeypatch):
  """Groups whose rewards are all equal are dropped; generation goes on until train_batch_size groups."""
  cfg = load("grpo_tiny", ["--config.data.train_batch_size=2", "--config.rollout.n=2",
                           "--config.algorithm.max_num_gen_batches=5"])
  right = ["<think>x</think><answer>A</answer>"]
  wrong = ["<think>x</think><answer>B</answer>"]
  # Per generation (2 prompts x 2 samples): which prompts' groups have mixed rewards.
  plans = iter([[wrong, wrong, right, right], [right, wrong, wrong, wrong], [wrong, wrong, wrong, right]])
  calls = []

  def fake_generate(model, tok, tasks, agent_cfg, key, batch_size, *engine):
    calls.append(len(tasks))
    return [_fake_traj(t, turns, 0) for t, turns in zip(tasks, next(plans))]
  monkeypatch.setattr(grpo, "generate", fake_generate)
  records = iter([types.SimpleNamespace(video="v", problem="<image>q", solution="A", doc_id=i, data_source="s",
                                        answer_type="multiple_choice") for i in range(100)])
  reward_cfg = grpo.RewardConfig()
  ro = grpo.collect(None, None, records, cfg, reward_cfg, grpo.agent_config(cfg.rollout), jax.random.key(0), 0)
  assert calls == [4, 4, 4] and ro.gen_batches == 3
  assert len(ro.trajs) == 4 and list(ro.groups) == [0, 0, 1, 1]
  # Kept: generation 2's first group (0.9+0.1 vs 0.1) and generation 3's second group.
  assert [s["score"] for s in ro.scores] == [1.0, 0.1, 0.1, 1.0]
  a = 0.9 / np.std([1.0, 0.1], ddof=1) / 2  # (r - mean) / (unbiased std + 1e-6)
  np.testing.assert_allclose(ro.advantages, [a, -a, -a, a], rtol=1e-5)
  assert len(ro.all_trajs) == 12  # metrics see every generated trajectory


def test_dynamic_sampling_cap(monkeypatch):
  cfg = load("grpo_tiny", ["--config.data.train_batch_size=2", "--config.rollout.n=2",
                           "--config.algorithm.max_num_gen_batches=2"])
  same = ["<think>x</think><answer>B</answer>"]
  monkeypatch.setattr(grpo, "generate", lambda m, t, tasks, a, k, b, *e: [_fake_traj(x, same, 0) for x in tasks])
  records = iter([types.SimpleNamespace(video="v", problem="<image>q", solution="A", doc_id=i, data_source="s",
                                        answer_type="multiple_choice") for i in range(100)])
  ro = grpo.collect(None, None, records, cfg, grpo.RewardConfig(), grpo.agent_config(cfg.rollout), jax.random.key(0), 0)
  assert ro.gen_batches == 2 and len(ro.trajs) == 4 and np.all(ro.advantages == 0)


def test_collect_uses_the_configured_advantage_estimator(monkeypatch):
  cfg = load("grpo_tiny", ["--config.data.train_batch_size=1", "--config.rollout.n=3",
                           "--config.algorithm.adv_estimator=rloo"])
  right, wrong = ["<think>x</think><answer>A</answer>"], ["<think>x</think><answer>B</answer>"]
  monkeypatch.setattr(grpo, "generate", lambda m, t, tasks, a, k, b, *e: [_fake_traj(x, turns, 0) for x, turns in
                                                                       zip(tasks, [right, wrong, wrong])])
  records = iter([types.SimpleNamespace(video="v", problem="<image>q", solution="A", doc_id=0, data_source="s",
                                        answer_type="multiple_choice")])
  ro = grpo.collect(None, None, records, cfg, grpo.RewardConfig(), grpo.agent_config(cfg.rollout), jax.random.key(0), 0)
  # scores 1.0, 0.1, 0.1: each minus the mean of the other two
  np.testing.assert_allclose(ro.advantages, [0.9, -0.45, -0.45], rtol=1e-6)


def test_misspelt_config_key_fails_with_the_closest_names(capsys, tmp_path):
  with pytest.raises(KeyError, match="clip_ratio_high"):
    load("grpo_tiny", ["--config.actor.clip_ratio_hgh=0.3"])
  assert main(["train", "--config=grpo_7b", "--config.actor.kl_loss_tipe=kl"]) == 2
  assert "actor.kl_loss_type" in capsys.readouterr().err
  assert main(["train", "--config=sft_tiny", "--config.data.train_files=()", f"--config.workdir={tmp_path}"]) == 2
  assert "data.train_files is empty" in capsys.readouterr().err
  assert main(["train", "--config=grpo_tiny", "--config.algorithm.adv_estimator=gae",
               f"--config.workdir={tmp_path}"]) == 2
  assert "algorithm.adv_estimator 'gae' is not one of ['grpo', 'rloo']" in capsys.readouterr().err


def test_the_sampler_weights_move_to_a_rollout_mesh_that_orders_the_chips_differently(tmp_path):
  """`make_mesh` may list the same chips in another order for the rollout mesh than for training (v5p-64: the
  rollout's single-chip replicas host by host, training in torus order); no one jit can take the weights in one
  order and give them in the other, so `rollout_model` moves the cast weights with `device_put`. They arrive in
  the rollout layout with the training weights' values."""
  from flax import nnx
  from jax.sharding import Mesh
  from zoomer_jax.checkpoint.orbax_io import state_shardings
  from zoomer_jax.train.grpo import grpo_loss_fns
  from zoomer_jax.train.trainer import Engine
  cfg = load("grpo_tiny", SMALL + ["--config.mesh.ici=(1,8,1)", f"--config.workdir={tmp_path}"])
  loss, _ = grpo_loss_fns(cfg)
  devices = np.array(jax.devices()[::-1]).reshape(8, 1, 1)
  rollout = Mesh(devices, ("data", "fsdp", "tensor"))
  engine = Engine(cfg, loss, total_steps=1, optim=cfg.actor.optim, freeze_vision=False, save_freq=1, max_to_keep=1,
                  rollout_mesh=rollout)
  assert not engine.steps.same_order  # the path under test
  p_train = nnx.state(engine.model(), nnx.Param)
  p_sampler = nnx.state(engine.rollout_model(), nnx.Param)
  want = state_shardings(p_sampler, rollout, engine.rules)
  assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, p_sampler)) == jax.tree.leaves(want)
  for a, b in zip(jax.tree.leaves(p_train), jax.tree.leaves(p_sampler)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_the_sampler_runs_by_its_own_rules_table(tmp_path):
  """`rollout.mesh.rules`: context-parallel training beside a tensor-parallel sampler on its own mesh. The two
  models share parameters and compute the same logits; each lays its weights out by its own table; a table
  without a mesh of its own is refused."""
  from jax.sharding import NamedSharding
  from flax import nnx
  import tolerances as tol
  from zoomer_jax.checkpoint.orbax_io import state_shardings
  from zoomer_jax.parallel.rules import CONTEXT_PARALLEL, DEFAULT_RULES, check_rules
  from zoomer_jax.train.grpo import grpo_loss_fns, rollout_mesh, rollout_rules
  from zoomer_jax.train.trainer import Engine
  cfg = load("grpo_tiny", SMALL + ["--config.mesh.ici=(1,4,2)", "--config.rollout.mesh.ici=(4,1,2)",
                                   f"--config.workdir={tmp_path}", "--config.init.dtype=float32"])
  cfg.mesh.rules = CONTEXT_PARALLEL + tuple(DEFAULT_RULES)
  cfg.rollout.mesh.rules = tuple(DEFAULT_RULES)
  loss, _ = grpo_loss_fns(cfg)
  engine = Engine(cfg, loss, total_steps=1, optim=cfg.actor.optim, freeze_vision=False, save_freq=1, max_to_keep=1,
                  rollout_mesh=rollout_mesh(cfg.rollout), rollout_rules=rollout_rules(cfg))
  train, sampler = engine.model(), engine.rollout_model()
  assert train.options.rules == check_rules(cfg.mesh.rules) and sampler.options.rules == check_rules(DEFAULT_RULES)
  p_train, p_sampler = nnx.state(train, nnx.Param), nnx.state(sampler, nnx.Param)
  want = state_shardings(p_sampler, engine.rollout_mesh, DEFAULT_RULES)
  got = jax.tree.map(lambda x: x.sharding, p_sampler)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)
  specs = lambda tree: [s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, tree))
                        if isinstance(s, NamedSharding)]
  assert "tensor" in str(specs(p_sampler)) and specs(p_sampler) != specs(p_train)
  ids = np.arange(1, 25, dtype=np.int32).reshape(2, 12) % 50
  pos = np.broadcast_to(np.arange(12, dtype=np.int32), (3, 2, 12))
  mask = np.ones((2, 12), bool)
  with jax.set_mesh(engine.mesh):
    a = np.asarray(jax.jit(lambda m: m.forward(ids, pos, mask)[0])(train))
  with jax.set_mesh(engine.rollout_mesh):
    b = np.asarray(jax.jit(lambda m: m.forward(ids, pos, mask)[0])(sampler))
  assert np.abs(a - b).max() <= tol.LOGITS_FP32

  cfg.rollout.mesh.ici = ()
  with pytest.raises(ValueError, match=r"rollout.mesh.rules is set but rollout.mesh.ici is \(\)"):
    rollout_rules(cfg)
