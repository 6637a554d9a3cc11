"""Peak host memory of `load_hf` on a synthetic Qwen2.5-VL checkpoint, against the model's size.

The checkpoint is made at bench time in the hub layout (config.json, `model-0000i-of-0000n.safetensors`
shards, `model.safetensors.index.json`, legacy key spelling), with random weights written tensor by
tensor in chunks. Names and shapes come from the abstract model and `key_map.nnx_to_hf`, so the layout
is exactly what `load_hf` expects. The text decoder is Qwen2.5-1.5B-wide (hidden 1536, full 151936
vocabulary, untied) with as many layers as the size asks for; the vision tower is 4 blocks of the real
width.

Every load runs in a fresh process, one per (loader, dtype, mesh) case, interleaved over repeats. The
process records its RSS after importing jax and building the mesh (the baseline), resets the kernel's
high-water mark, loads, and reads the peak (VmHWM); a sampling thread records the RssAnon / RssFile
split (memory-mapped file pages count in RSS too). On CPU the devices live in host memory, so the
loaded model itself is part of RSS: the figure of merit is (peak - baseline) / model bytes, where model
bytes is the sum of parameter sizes in the loaded dtype. `shards` sums every device's shard (replicas
count again); `distinct` counts each host buffer once (XLA's CPU client can let replicas share one).
The named baseline loader `naive` reads every tensor into host memory first, then puts them on the
devices (a full host copy). A few parameters of every load are compared exactly with the file contents.

  PYTHONPATH=. python bench/bench_load_memory.py
  PYTHONPATH=. python bench/bench_load_memory.py --size-gb 1.1 --dtype bfloat16 --mesh none,1x8x1
  git show HEAD~1:zoomer_jax/checkpoint/hf_import.py > /tmp/old_import.py   # an older loader, to compare
  PYTHONPATH=. python bench/bench_load_memory.py --loaders load_hf,/tmp/old_import.py:load_hf --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
# Parameters compared with the file after each load: every transform kind and both towers.
CHECKED = ["model.embed_tokens.embedding", "lm_head.kernel", "model.layers.0.self_attn.q_proj.kernel",
           "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.o_proj.kernel",
           "model.layers.0.mlp.down_proj.kernel", "model.norm.weight", "visual.patch_embed.kernel",
           "visual.blocks.0.attn.qkv.kernel", "visual.blocks.0.attn.qkv.bias",
           "visual.blocks.0.attn.proj.kernel", "visual.merger.fc1.kernel"]


# ---------------------------------------------------------------- the synthetic checkpoint
def synthetic_config(size_bytes: int, itemsize: int):
  """A Qwen2.5-VL config whose checkpoint holds at least `size_bytes` at `itemsize` bytes a weight."""
  from zoomer_jax.model.config import ModelConfig, TextConfig, VisionConfig

  def make(layers):
    text = TextConfig(vocab_size=151936, hidden_size=1536, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=2, intermediate_size=8960, mrope_section=(16, 24, 24),
                      max_position_embeddings=32768)
    vision = VisionConfig(depth=4, hidden_size=1280, num_heads=16, intermediate_size=3420,
                          out_hidden_size=1536, fullatt_block_indexes=(1, 3))
    return ModelConfig(text=text, vision=vision, pad_token_id=151643)

  one, two = (sum(math.prod(s) for _, s, _ in param_specs(make(n))) for n in (1, 2))
  layers = max(1, 1 + math.ceil((size_bytes / itemsize - one) / (two - one)))
  return make(layers)


def param_specs(cfg) -> list[tuple[str, tuple[int, ...], tuple]]:
  """(HF key, HF shape, NNX path) of every parameter, in the model's parameter order."""
  from flax import nnx
  from zoomer_jax.checkpoint.hf_import import abstract_model
  from zoomer_jax.checkpoint.key_map import nnx_to_hf

  _, state = nnx.split(abstract_model(cfg))
  out = []
  for path, var in nnx.to_flat_state(state):
    if cfg.text.tie_word_embeddings and path == ("lm_head", "kernel"):
      continue
    key, transform = nnx_to_hf(path)
    out.append((key, tuple(transform.hf_shape(var.get_value().shape, cfg)), tuple(path)))
  return out


def write_checkpoint(out_dir: str, cfg, file_dtype, shard_bytes: int, seed: int = 0) -> int:
  """Writes the hub layout with random weights, one chunk of one tensor in memory at a time; returns bytes."""
  from zoomer_jax.checkpoint.safetensors_io import NAMES
  from zoomer_jax.model.config import ModelConfig

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f, indent=2)
  back = ModelConfig.from_hf_file(out_dir)
  if back != cfg:
    raise AssertionError(f"config.json does not round-trip:\n{back}\n!=\n{cfg}")

  itemsize = np.dtype(file_dtype).itemsize
  shards, current, size = [], [], 0
  for key, shape, _ in param_specs(cfg):
    nbytes = math.prod(shape) * itemsize
    if current and size + nbytes > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((key, shape))
    size += nbytes
  shards.append(current)

  rng = np.random.default_rng(seed)
  weight_map, total = {}, 0
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, entries in zip(names, shards):
    header, offset = {}, 0
    for key, shape in entries:
      nbytes = math.prod(shape) * itemsize
      header[key] = {"dtype": NAMES[np.dtype(file_dtype)], "shape": list(shape),
                     "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[key] = name
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(len(blob).to_bytes(8, "little"))
      f.write(blob)
      for key, shape in entries:
        n = math.prod(shape)
        for start in range(0, n, 2**23):
          chunk = rng.standard_normal(min(2**23, n - start), np.float32)
          chunk *= 0.02
          f.write(chunk.astype(file_dtype).view(np.uint8))
    total += offset
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
              indent=2)
  return total


# ---------------------------------------------------------------- one load, in a fresh process
def proc_status() -> dict[str, int]:
  """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      name, _, rest = line.partition(":")
      if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
        out[name] = int(rest.split()[0]) * 1024
  return out


class Sampler(threading.Thread):
  """Polls /proc/self/status; keeps the sample with the largest VmRSS and the largest RssFile."""

  def __init__(self, interval: float = 0.002):
    super().__init__(daemon=True)
    self.interval, self.stop_flag = interval, threading.Event()
    self.at_peak, self.max_file, self.n = proc_status(), 0, 0

  def run(self):
    while not self.stop_flag.is_set():
      s = proc_status()
      self.n += 1
      if s["VmRSS"] > self.at_peak["VmRSS"]:
        self.at_peak = s
      self.max_file = max(self.max_file, s["RssFile"])
      time.sleep(self.interval)

  def stop(self):
    self.stop_flag.set()
    self.join()


def naive_load(path, dtype="float32", mesh=None):
  """The baseline: every tensor read into host memory first (a full host copy), then put on the devices."""
  import jax
  from flax import nnx
  from zoomer_jax.checkpoint.hf_import import abstract_model
  from zoomer_jax.checkpoint.key_map import hf_to_nnx
  from zoomer_jax.checkpoint.safetensors_io import checkpoint_files, iter_tensors
  from zoomer_jax.model.config import ModelConfig
  from zoomer_jax.model.qwen25vl import resolve_dtype
  from zoomer_jax.parallel.rules import DEFAULT_RULES, variable_sharding

  cfg = ModelConfig.from_hf_file(path)
  graphdef, state = nnx.split(abstract_model(cfg, resolve_dtype(dtype)))
  targets = dict(nnx.to_flat_state(state))
  host = {}
  for key, f in iter_tensors(checkpoint_files(path)):
    nnx_path, transform = hf_to_nnx(key)
    shape = targets[nnx_path].get_value().shape
    host[nnx_path] = transform.to_nnx(np.array(f.get(key)), shape).astype(resolve_dtype(dtype))
  for nnx_path, var in targets.items():
    sharding = variable_sharding(var, mesh, DEFAULT_RULES) if mesh is not None else None
    var.set_value(jax.device_put(host.pop(nnx_path), sharding))
  return nnx.merge(graphdef, nnx.from_flat_state(targets))


def resolve_loader(spec: str):
  """`load_hf`, `naive`, `package.module:function` or `path/to/file.py:function`."""
  if spec == "load_hf":
    from zoomer_jax.checkpoint.hf_import import load_hf
    return load_hf
  if spec == "naive":
    return naive_load
  where, _, fn = spec.rpartition(":")
  if where.endswith(".py"):
    module_spec = importlib.util.spec_from_file_location("bench_alt_loader", where)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    module = importlib.import_module(where)
  return getattr(module, fn)


def child(args) -> dict:
  """Loads the checkpoint once and measures; runs in its own process."""
  import jax
  from flax import nnx
  import zoomer_jax  # noqa: F401  (part of the baseline: everything imported, nothing built)
  from zoomer_jax.checkpoint.key_map import nnx_to_hf
  from zoomer_jax.checkpoint.safetensors_io import SafetensorsFile
  from zoomer_jax.model.qwen25vl import resolve_dtype
  from zoomer_jax.parallel.mesh import make_mesh

  load = resolve_loader(args.loader)
  dtype = resolve_dtype(args.child_dtype)
  mesh = None if args.child_mesh == "none" else make_mesh(tuple(int(d) for d in args.child_mesh.split("x")))
  jax.devices()
  gc.collect()
  base = proc_status()
  try:  # "5" resets the peak RSS (VmHWM) to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    hwm_reset = True
  except OSError:
    hwm_reset = False
  sampler = Sampler()
  sampler.start()
  t0 = time.perf_counter()
  model = load(args.dir, dtype=args.child_dtype, mesh=mesh)
  _, state = nnx.split(model)
  leaves = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
  jax.block_until_ready(list(leaves.values()))
  seconds = time.perf_counter() - t0
  sampler.stop()
  after = proc_status()
  ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; before the checks

  model_bytes = sum(x.size * x.dtype.itemsize for x in leaves.values())
  shards = [s.data for x in leaves.values() for s in x.addressable_shards]
  shard_bytes = sum(s.nbytes for s in shards)
  distinct_bytes = sum({s.unsafe_buffer_pointer(): s.nbytes for s in shards}.values())
  if any(x.dtype != dtype for x in leaves.values()):
    raise AssertionError("a parameter was loaded in the wrong dtype")

  with open(os.path.join(args.dir, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  checked = 0
  for dotted in CHECKED:
    path = tuple(int(p) if p.isdigit() else p for p in dotted.split("."))
    key, transform = nnx_to_hf(path)
    got = np.asarray(jax.device_get(leaves[path]))
    want = transform.to_nnx(np.array(SafetensorsFile(os.path.join(args.dir, weight_map[key])).get(key)),
                            got.shape).astype(dtype)
    if not np.array_equal(got, want):
      raise AssertionError(f"{dotted} differs from {key} in the file")
    checked += 1

  peak = after["VmHWM"] if hwm_reset else max(after["VmHWM"], sampler.at_peak["VmRSS"])
  return dict(
      load_s=seconds, baseline=base["VmRSS"], peak=peak, after=after["VmRSS"], model_bytes=model_bytes,
      shard_bytes=shard_bytes, distinct_bytes=distinct_bytes, hwm_reset=hwm_reset,
      peak_anon=sampler.at_peak["RssAnon"], peak_file=sampler.at_peak["RssFile"], max_file=sampler.max_file,
      base_anon=base["RssAnon"], base_file=base["RssFile"], after_anon=after["RssAnon"],
      after_file=after["RssFile"], ru_maxrss=ru_maxrss,
      samples=sampler.n, checked=checked, ratio=(peak - base["VmRSS"]) / model_bytes,
      raw_ratio=peak / model_bytes, devices=len(jax.devices()))


def run_case(script_args: argparse.Namespace, loader: str, dtype: str, mesh: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  n = 1 if mesh == "none" else math.prod(int(d) for d in mesh.split("x"))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dir", script_args.dir, "--loader", loader,
         "--child-dtype", dtype, "--child-mesh", mesh]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("CHILD_JSON ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")
  return dict(json.loads(lines[-1][len("CHILD_JSON "):]), loader=loader, dtype=dtype, mesh=mesh)


def summarize(runs: list[dict]) -> dict:
  """Medians over repeats of one case (the peak is close to deterministic; the time is not)."""
  out = dict(runs[0])
  for k, v in runs[0].items():
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      out[k] = statistics.median(r[k] for r in runs)
  out["load_s_all"] = [round(r["load_s"], 3) for r in runs]
  return out


def compare(rows: list[dict], subject: str) -> list[dict]:
  """`subject` against every other loader, case by case: ratios of (peak - baseline) and of load time."""
  by_case = {(r["loader"], r["dtype"], r["mesh"]): r for r in rows}
  out = []
  for (loader, dtype, mesh), r in by_case.items():
    s = by_case.get((subject, dtype, mesh))
    if loader != subject and s is not None:
      out.append(dict(loader=subject, baseline=loader, dtype=dtype, mesh=mesh,
                      extra_ratio=(s["peak"] - s["baseline"]) / (r["peak"] - r["baseline"]),
                      time_ratio=s["load_s"] / r["load_s"]))
  return out


def print_table(rows: list[dict]) -> None:
  cols = [("loader", 10), ("dtype", 9), ("mesh", 6), ("load s", 7), ("base", 6), ("peak", 6), ("pk-base", 7),
          ("model", 6), ("(pk-b)/M", 8), ("pk/M", 5), ("after-b", 7), ("anon@pk", 7), ("file@pk", 7),
          ("max file", 8), ("ru_max", 6), ("shards", 6), ("distinct", 8)]
  print("MiB throughout; M = model bytes in the loaded dtype; anon/file = RssAnon/RssFile in the sample "
        "nearest the peak")
  print(" ".join(f"{name:>{w}}" for name, w in cols))
  for r in rows:
    loader = r["loader"] if len(r["loader"]) <= 10 else "…" + r["loader"][-9:]
    vals = [loader, r["dtype"], r["mesh"], f"{r['load_s']:.2f}", r["baseline"] / MIB, r["peak"] / MIB,
            (r["peak"] - r["baseline"]) / MIB, r["model_bytes"] / MIB, f"{r['ratio']:.3f}",
            f"{r['raw_ratio']:.2f}", (r["after"] - r["baseline"]) / MIB, r["peak_anon"] / MIB,
            r["peak_file"] / MIB, r["max_file"] / MIB, r["ru_maxrss"] / MIB, r["shard_bytes"] / MIB,
            r["distinct_bytes"] / MIB]
    print(" ".join(f"{v:>{w}.0f}" if isinstance(v, float) else f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size-gb", type=float, default=1.5, help="checkpoint size on disk (GiB), at least")
  p.add_argument("--file-dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--dtype", default="both", choices=["bfloat16", "float32", "both"], help="loaded dtype")
  p.add_argument("--mesh", default="none,1x8x1,2x2x2", help="comma list of `none` or data x fsdp x tensor")
  p.add_argument("--loaders", default="load_hf,naive",
                 help="comma list: load_hf, naive (the baseline), module:function or file.py:function")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--shard-mb", type=int, default=400)
  p.add_argument("--dir", default=None, help="checkpoint directory (reused if it holds one)")
  p.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
  p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_load_memory.json"))
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--loader", help=argparse.SUPPRESS)
  p.add_argument("--child-dtype", help=argparse.SUPPRESS)
  p.add_argument("--child-mesh", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print("CHILD_JSON " + json.dumps(child(args)))
    return

  import ml_dtypes
  from zoomer_jax.model.config import ModelConfig

  file_dtype = np.dtype(ml_dtypes.bfloat16 if args.file_dtype == "bfloat16" else np.float32)
  made = args.dir is None or not os.path.exists(os.path.join(args.dir or "", "model.safetensors.index.json"))
  args.dir = args.dir or tempfile.mkdtemp(prefix="bench_load_memory_")
  t0 = time.perf_counter()
  if made:
    cfg = synthetic_config(int(args.size_gb * 2**30), file_dtype.itemsize)
    file_bytes = write_checkpoint(args.dir, cfg, file_dtype, args.shard_mb * MIB)
  else:
    cfg = ModelConfig.from_hf_file(args.dir)
    with open(os.path.join(args.dir, "model.safetensors.index.json")) as f:
      file_bytes = json.load(f)["metadata"]["total_size"]
  n_files = len([f for f in os.listdir(args.dir) if f.endswith(".safetensors")])
  print(f"checkpoint {args.dir}: {file_bytes / 2**30:.2f} GiB {args.file_dtype} in {n_files} files, "
        f"{cfg.text.num_hidden_layers} text layers, {cfg.vision.depth} vision blocks "
        f"({'made' if made else 'reused'} in {time.perf_counter() - t0:.1f} s)")

  dtypes = ["bfloat16", "float32"] if args.dtype == "both" else [args.dtype]
  meshes = args.mesh.split(",")
  loaders = args.loaders.split(",")
  runs: dict[tuple, list] = {}
  try:
    for _ in range(args.repeats):
      for dtype in dtypes:
        for mesh in meshes:
          for loader in loaders:
            r = run_case(args, loader, dtype, mesh)
            runs.setdefault((loader, dtype, mesh), []).append(r)
            print(f"  {loader} {dtype} mesh={mesh}: {r['load_s']:.2f} s, (peak-base)/M = {r['ratio']:.3f}",
                  flush=True)
  finally:
    if made and not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)
  rows = [summarize(v) for v in runs.values()]
  print_table(rows)
  comparisons = compare(rows, loaders[0])
  for c in comparisons:
    print(f"{c['loader']} vs {c['baseline']} ({c['dtype']}, mesh {c['mesh']}): peak - baseline "
          f"x{c['extra_ratio']:.2f}, load time x{c['time_ratio']:.2f}")
  result = dict(bench="load_memory", file_gib=file_bytes / 2**30, file_dtype=args.file_dtype, files=n_files,
                text_layers=cfg.text.num_hidden_layers, host=platform.node(), cpus=os.cpu_count(),
                repeats=args.repeats, rows=rows, comparisons=comparisons)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print("BENCH_JSON " + json.dumps(result))


if __name__ == "__main__":
  main()
