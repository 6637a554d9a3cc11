"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""

import os
import sys
import zlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# name -> measured value; printed at the end of the run so CI logs show what the parity tests measured.
MEASURED: dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test module, drop JAX's caches of compiled programs. Each program XLA:CPU compiles holds a few
  memory mappings until it is released; one process running the whole suite otherwise accumulates them up to
  the kernel's vm.max_map_count (65,530 here), past which XLA's compiler crashes (a segfault in
  `backend_compile_and_load`, seen at the same test in CI and here)."""
  yield
  import gc  # noqa: PLC0415

  import jax  # noqa: PLC0415
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def rng(request):
  """A fresh generator per test, seeded from the test's id (stable across runs, distinct per test)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def measure(request):
  """measure(name, value): records a measured number under the test's id for the end-of-run report."""
  def record(name, value):
    MEASURED[f"{request.node.name}::{name}"] = float(value)
  return record


def pytest_terminal_summary(terminalreporter):
  if MEASURED:
    terminalreporter.section("measured values")
    for k, v in sorted(MEASURED.items()):
      terminalreporter.write_line(f"{k:90s} {v:.3e}")
