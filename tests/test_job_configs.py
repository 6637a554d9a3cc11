"""Every file under configs/ loads; job configs carry the fields their jobs read; overrides keep types."""

import os

import pytest

from zoomer_jax.config_loader import CONFIG_DIR, load
from zoomer_jax.model.config import ModelConfig
from zoomer_jax.train.grpo_loss import GRPOLossConfig
from zoomer_jax.train.grpo import LOSS_KEYS
from zoomer_jax.train.optim import _KNOWN as OPTIM_KEYS
from zoomer_jax.agent.rewards import RewardConfig

NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))


@pytest.mark.parametrize("name", NAMES)
def test_config_loads(name):
  cfg = load(name)
  if "model" in cfg:
    ModelConfig.from_config_dict(cfg.model.to_dict())  # a valid architecture


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("grpo_")])
def test_grpo_configs_have_what_the_job_reads(name):
  cfg = load(name)
  assert cfg.job == "grpo"
  GRPOLossConfig(**{k: cfg.actor[k] for k in LOSS_KEYS})
  RewardConfig.from_dict(cfg.reward.to_dict())
  assert set(cfg.actor.optim) <= OPTIM_KEYS
  assert cfg.data.train_batch_size % cfg.actor.ppo_mini_batch_size == 0
  assert cfg.actor.ppo_mini_batch_size * cfg.rollout.n % cfg.actor.ppo_micro_batch_size == 0


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("sft_")])
def test_sft_configs_have_what_the_job_reads(name):
  cfg = load(name)
  assert cfg.job == "sft" and set(cfg.optim) <= OPTIM_KEYS
  assert cfg.data.batch_size % cfg.data.micro_batch_size == 0


def test_overrides_keep_types_and_reject_typos():
  cfg = load("grpo_7b", ["--config.actor.clip_ratio_high=0.28", "--config.rollout.n=8",
                         "--config.data.train_files=('a.json','b.json')", "--config.actor.optim.lr=2e-6"])
  assert cfg.actor.clip_ratio_high == 0.28 and cfg.rollout.n == 8 and cfg.actor.optim.lr == 2e-6
  assert cfg.data.train_files == ("a.json", "b.json")
  with pytest.raises(KeyError, match="did you mean"):
    load("grpo_7b", ["--config.actor.clip_ratio_hihg=0.3"])
  with pytest.raises(ValueError, match="unknown variant"):
    load("grpo_7b:bigger")
