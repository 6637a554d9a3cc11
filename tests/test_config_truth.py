"""Config truth both ways: the code reads no knob that the configs don't declare, and the configs declare nothing
the code doesn't read.

Both directions rest on one static analysis of `zoomer_jax/`, `launch/` and `bench/` (`ConfigFlow`): which
expressions hold a job config or a section of it, as key paths from the config's root. A path starts at a
seed (an entry point's parameter, or what `config_loader.load` returns) and flows through assignments,
`self.x = ...`, call arguments into parameters, return values, and copies (`dict(x)`, `x.to_dict()`,
`copy.deepcopy(x)`); it is flow-insensitive within a function and iterated to a fixed point. On those
expressions it records

  * reads: `x.key`, `x["key"]`, `x[k]` over a constant tuple of keys, `getattr(x, "key")`;
  * whole reads: `**x`, `x.items()`, iterating over `x`, `set(x)` - a dataclass or function takes the section
    whole, and `whole_consumers` checks its keys against what that consumer takes, both ways;
  * undeclared reads: `x.get(...)`, `getattr(x, "key", default)`, `hasattr(x, ...)`, `"key" in x`, which read
    a knob that the config may not declare (then `--config.a.key=...` fails as an unknown key);
  * stores: `x.key = ...`, `x.update(...)` outside configs/ overwrite a declared knob, so an override of it
    is lost.

JSON records and HF config.json dicts never flow from a config, so their `.get` is not flagged.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import re
from collections import defaultdict

import ml_collections
import pytest

from zoomer_jax.config_loader import CONFIG_DIR, load

REPO = os.path.dirname(CONFIG_DIR)
SCANNED = ("zoomer_jax", "launch", "bench")

# Where each kind of config enters the code: (file, function, variable).
SEEDS = {
    "sft": [("zoomer_jax/train/sft.py", "run_sft", "cfg"), ("zoomer_jax/cost/workload.py", "job_from_config", "cfg")],
    "grpo": [("zoomer_jax/train/grpo.py", "run_grpo", "cfg"),
             ("zoomer_jax/cost/workload.py", "job_from_config", "cfg")],
    "eval": [("zoomer_jax/eval/harness.py", "main", "cfg")],
    "demo": [("zoomer_jax/demo/pipeline.py", "run_demo", "cfg")],
    "model": [("zoomer_jax/__main__.py", "forward", "cfg"), ("zoomer_jax/__main__.py", "_model_and_tokenizer", "cfg")],
    "distill": [("zoomer_jax/data/distill.py", "run_distill", "cfg")],
    "reflect": [("zoomer_jax/data/reflect.py", "run_reflect", "cfg")],
    "serve": [("zoomer_jax/serve/server.py", "run_serve", "cfg")],
}
KIND_OF_PREFIX = {"sft_": "sft", "grpo_": "grpo", "eval_": "eval", "demo": "demo", "qwen25vl_": "model",
                  "distill": "distill", "reflect": "reflect", "serve": "serve"}
CLI_READS = {("job",)}  # `python -m zoomer_jax train` picks the job by `cfg.job` (asserted below)

# The only undeclared reads: (file, key) -> why.
ALLOWED_UNDECLARED = {
    ("zoomer_jax/__main__.py", "job"): "`train` tells a job config from a model or demo config, which have no job",
    ("zoomer_jax/config_loader.py", None): "apply_overrides tests each override's key against the config: the "
                                           "unknown-key error itself",
}
# Declared knobs the code stores to, and why the user's value still counts: (kind, path) -> why.
ALLOWED_STORES = {
    ("demo", "sft.train.total_steps"): "the pipeline splits the declared total between its two SFT jobs",
    ("demo", "sft.init.checkpoint"): "the first SFT job starts from it; the second from the first one's export",
}

_COPIES = {"to_dict", "copy_and_resolve_references", "copy", "deepcopy", "dict", "ConfigDict"}  # return their argument
_WHOLE_METHODS = {"items", "values", "keys"}
_WHOLE_BUILTINS = {"set", "list", "sorted", "tuple", "frozenset"}
_NOT_READS = {"to_json", "to_json_best_effort", "lock", "unlock", "unlocked", "ignore_type"}


# ---------------------------------------------------------------------------------------------- the analysis
@dataclasses.dataclass(eq=False)
class Func:
  file: str
  name: str
  node: ast.AST
  cls: str | None  # the enclosing class of a method
  parent: "Func | None"  # the enclosing function of a nested one (closures read its variables)
  params: list[str]
  offset: int  # leading parameters a bound call does not pass (self, cls)


def _params(node) -> list[str]:
  a = node.args
  return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def _statements(node):
  """The statements (and with-items, except handlers) under `node`, not inside expressions (which `_ev` walks)
  nor inside nested functions and classes (analysed on their own)."""
  stack = [c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr)]
  while stack:
    n = stack.pop()
    yield n
    if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      stack.extend(c for c in ast.iter_child_nodes(n) if not isinstance(c, ast.expr))


class Index:
  """The parsed modules: their functions, classes, imports and module-level string tuples."""

  def __init__(self, sources: dict[str, str]):
    self.trees = {f: ast.parse(src, f) for f, src in sources.items()}
    self.funcs: list[Func] = []
    self.top: dict[str, dict[str, Func]] = defaultdict(dict)  # file -> top-level function name -> Func
    self.classes: dict[str, dict[str, dict[str, Func]]] = defaultdict(dict)  # file -> class -> method -> Func
    self.methods: dict[str, list[Func]] = defaultdict(list)  # method name -> every method so named
    self.imports: dict[str, dict[str, tuple[str, str | None]]] = defaultdict(dict)  # alias -> (module, name)
    self.constants: dict[str, dict[str, tuple[str, ...]]] = defaultdict(dict)  # file -> NAME -> string tuple
    for f, tree in self.trees.items():
      self._index(f, tree, None, None)
      for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
          for a in n.names:
            self.imports[f][a.asname or a.name] = (n.module, a.name)
        elif isinstance(n, ast.Import):
          for a in n.names:
            self.imports[f][a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
      for n in tree.body:
        if isinstance(n, ast.Assign) and isinstance(n.value, (ast.Tuple, ast.List, ast.Set)):
          if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in n.value.elts):
            for t in n.targets:
              if isinstance(t, ast.Name):
                self.constants[f][t.id] = tuple(e.value for e in n.value.elts)

  def _index(self, f, node, cls, parent):
    for n in ast.iter_child_nodes(node):
      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
        decos = {d.id for d in n.decorator_list if isinstance(d, ast.Name)}
        offset = 1 if cls is not None and "staticmethod" not in decos else 0
        fn = Func(f, n.name, n, cls, parent, _params(n), offset)
        self.funcs.append(fn)
        if cls is not None and parent is None:
          self.classes[f].setdefault(cls, {})[n.name] = fn
          self.methods[n.name].append(fn)
        elif parent is None:
          self.top[f][n.name] = fn
        self._index(f, n, None, fn)
      elif isinstance(n, ast.ClassDef):
        self._index(f, n, n.name, parent)
      else:
        self._index(f, n, cls, parent)

  def module_file(self, module: str) -> str | None:
    base = module.replace(".", "/")
    for f in (base + ".py", base + "/__init__.py"):
      if f in self.trees:
        return f
    return None

  def resolve(self, f: str, name: str, depth: int = 0):
    """What `name` means at the top of file f: ("func", Func), ("class", (file, name)), ("module", file), None."""
    if name in self.top[f]:
      return ("func", self.top[f][name])
    if name in self.classes[f]:
      return ("class", (f, name))
    if name in self.imports[f] and depth < 4:
      module, attr = self.imports[f][name]
      if attr is None:
        target = self.module_file(module)
        return ("module", target) if target else None
      sub = self.module_file(f"{module}.{attr}")
      if sub:
        return ("module", sub)
      target = self.module_file(module)
      return self.resolve(target, attr, depth + 1) if target else None
    return None


class ConfigFlow:
  """Config key paths held by the expressions of `index`, from `seeds`; see the module docstring."""

  def __init__(self, index: Index, seeds=(), *, sections: set[tuple], from_load: bool = False):
    self.ix = index
    self.sections = set(sections)  # the paths that name sections (not leaves) in some config
    self.env: dict[Func, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    self.self_attrs: dict[tuple, set] = defaultdict(set)  # (file, class, attribute) -> paths
    self.returns: dict[Func, set] = defaultdict(set)
    self.reads: dict[tuple, set] = defaultdict(set)  # path -> {"file:line"}
    self.whole: dict[tuple, set] = defaultdict(set)
    self.stores: dict[tuple, set] = defaultdict(set)
    self.aliases: dict[tuple, set] = defaultdict(set)  # config path stored into -> the config paths stored
    self.copy_stores: dict[tuple, set] = defaultdict(set)  # section -> sections whose keys x.update(y) stores
    self.undeclared: list[tuple[str, int, str, str | None]] = []  # (file, line, what, key)
    self._callers: dict[Func, set] = defaultdict(set)
    self._by_name = {(fn.file, fn.name): fn for fn in index.funcs}
    loader = index.top.get("zoomer_jax/config_loader.py", {}).get("load")
    if from_load and loader is not None:
      self.returns[loader].add(())
    for f, func, var in seeds:
      assert (f, func) in self._by_name, f"seed {f}:{func} is gone: update SEEDS"
      self.env[self._by_name[(f, func)]][var].add(())
    n_sections = -1
    while n_sections != len(self.sections):  # `job.model = cfg.model` makes job.model a section: go again
      n_sections = len(self.sections)
      self._queue = list(index.funcs)
      self._queued = set(self._queue)
      while self._queue:
        fn = self._queue.pop()
        self._queued.discard(fn)
        self._run(fn)
    self._apply_aliases()

  # -------------------------------------------------------------------- fixed point
  def _enqueue(self, fn):
    if fn not in self._queued:
      self._queued.add(fn)
      self._queue.append(fn)

  def _lookup(self, fn, name) -> set:
    while fn is not None:
      if name in self.env[fn]:
        return self.env[fn][name]
      fn = fn.parent
    return set()

  def _bind(self, fn, target, paths, value=None):
    if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
        and len(target.elts) == len(value.elts):
      for t, v in zip(target.elts, value.elts):
        self._bind(fn, t, self._ev(fn, v), v)
      return
    if isinstance(target, (ast.Attribute, ast.Subscript)):
      self._ev(fn, target)  # records the store
    if not paths:
      return
    if isinstance(target, ast.Name):
      if not paths <= self.env[fn][target.id]:
        self.env[fn][target.id] |= paths
        self._enqueue(fn)
    elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self" \
        and fn.cls is not None:
      key = (fn.file, fn.cls, target.attr)
      if not paths <= self.self_attrs[key]:
        self.self_attrs[key] |= paths
        for m in self.ix.classes[fn.file].get(fn.cls, {}).values():
          self._enqueue(m)
    elif isinstance(target, ast.Attribute):
      for p in self._ev(fn, target.value):
        self.aliases[p + (target.attr,)] |= paths
        self.sections.add(p + (target.attr,))

  def _run(self, fn):
    for n in _statements(fn.node):
      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        continue
      if isinstance(n, ast.Assign):
        vals = self._ev(fn, n.value)
        for t in n.targets:
          self._bind(fn, t, vals, n.value)
      elif isinstance(n, ast.AnnAssign):
        if n.value is not None:
          self._bind(fn, n.target, self._ev(fn, n.value), n.value)
      elif isinstance(n, ast.AugAssign):  # x.k += 1 reads x.k and keeps what the user set in it
        self._ev(fn, n.value)
        self._ev(fn, ast.Attribute(n.target.value, n.target.attr, ast.Load(), lineno=n.lineno)
                 if isinstance(n.target, ast.Attribute) else n.target)
      elif isinstance(n, ast.For):
        self._iterate(fn, n.iter)
      elif isinstance(n, ast.Return):
        paths = self._ev(fn, n.value) if n.value is not None else set()
        if not paths <= self.returns[fn]:
          self.returns[fn] |= paths
          for c in self._callers[fn]:
            self._enqueue(c)
      else:
        for child in ast.iter_child_nodes(n):
          if isinstance(child, ast.expr):
            self._ev(fn, child)

  def _iterate(self, fn, node):
    """`for ... in node`: iterating over a config reads it whole."""
    paths = self._ev(fn, node)
    if paths:
      self._whole(fn, node, paths)

  # -------------------------------------------------------------------- expressions
  def _where(self, fn, node) -> str:
    return f"{fn.file}:{getattr(node, 'lineno', 0)}"

  def _read(self, fn, node, paths, key):
    for p in paths:
      self.reads[p + (key,)].add(self._where(fn, node))

  def _whole(self, fn, node, paths):
    for p in paths:
      self.whole[p].add(self._where(fn, node))

  def _flag(self, fn, node, what, key):
    item = (fn.file, node.lineno, what, key)
    if item not in self.undeclared:
      self.undeclared.append(item)

  def _sections(self, paths, key) -> set:
    return {p + (key,) for p in paths} & self.sections

  def _ev(self, fn, node) -> set:
    """The config paths `node` holds (empty: not a config), recording what it reads on the way."""
    if isinstance(node, ast.Name):
      return set(self._lookup(fn, node.id))
    if isinstance(node, ast.Attribute):
      if isinstance(node.value, ast.Name) and node.value.id == "self" and fn.cls is not None:
        return set(self.self_attrs.get((fn.file, fn.cls, node.attr), ()))
      base = self._ev(fn, node.value)
      if not base or isinstance(node.ctx, (ast.Store, ast.Del)):
        if base and isinstance(node.ctx, ast.Store):
          for p in base:
            self.stores[p + (node.attr,)].add(self._where(fn, node))
        return set()
      self._read(fn, node, base, node.attr)
      return self._sections(base, node.attr)
    if isinstance(node, ast.Subscript):
      base = self._ev(fn, node.value)
      self._ev(fn, node.slice)
      if not base:
        return set()
      key = node.slice.value if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str) else None
      if isinstance(node.ctx, ast.Store):
        for p in base:
          if key is not None:  # x[k] = ...: a dict copy's values normalised by its consumer (model/config.py)
            self.stores[p + (key,)].add(self._where(fn, node))
        return set()
      if key is not None:
        self._read(fn, node, base, key)
        return self._sections(base, key)
      keys = self._loop_keys(fn, node.slice)
      if keys is None:
        self._whole(fn, node, base)
        return set()
      for k in keys:
        self._read(fn, node, base, k)
      return set().union(*(self._sections(base, k) for k in keys))
    if isinstance(node, ast.Call):
      return self._call(fn, node)
    if isinstance(node, ast.Compare):
      self._ev(fn, node.left)
      for op, right in zip(node.ops, node.comparators):
        if self._ev(fn, right) and isinstance(op, (ast.In, ast.NotIn)):
          key = node.left.value if isinstance(node.left, ast.Constant) else None
          self._flag(fn, node, "'in' test", key)
      return set()
    if isinstance(node, ast.IfExp):
      self._ev(fn, node.test)
      return self._ev(fn, node.body) | self._ev(fn, node.orelse)
    if isinstance(node, ast.BoolOp):
      return set().union(*(self._ev(fn, v) for v in node.values))
    if isinstance(node, ast.Lambda):
      self._ev(fn, node.body)
      return set()
    if isinstance(node, ast.Starred):
      return self._ev(fn, node.value)
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.expr):
        self._ev(fn, child)
      elif isinstance(child, ast.comprehension):
        self._iterate(fn, child.iter)
        for e in child.ifs:
          self._ev(fn, e)
      elif isinstance(child, ast.keyword):
        self._ev(fn, child.value)
    return set()

  def _loop_keys(self, fn, slice_node):
    """`x[k]` inside `for k in NAME` (a module-level tuple of strings): those strings; else None."""
    if not isinstance(slice_node, ast.Name):
      return None
    for n in ast.walk(fn.node):
      gens = n.generators if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)) else \
          [n] if isinstance(n, ast.For) else []
      for g in gens:
        if isinstance(g.target, ast.Name) and g.target.id == slice_node.id and isinstance(g.iter, ast.Name):
          return self.ix.constants[fn.file].get(g.iter.id)
    return None

  def _targets(self, r) -> list[tuple[Func, int]]:
    """(function, leading parameters the call does not pass) of a resolved name: a function, or a class's
    __init__."""
    if r is None or r[0] == "module":
      return []
    if r[0] == "func":
      return [(r[1], 0)]
    init = self.ix.classes[r[1][0]].get(r[1][1], {}).get("__init__")
    return [(init, 1)] if init else []

  def _callees(self, fn, func) -> list[tuple[Func, int]]:
    if isinstance(func, ast.Name):
      r = self.ix.resolve(fn.file, func.id)
      if r is None:
        return [(g, 0) for g in self.ix.funcs if g.parent is fn and g.name == func.id]
      return self._targets(r)
    if not isinstance(func, ast.Attribute):
      return []
    if isinstance(func.value, ast.Name) and func.value.id in ("self", "cls") and fn.cls is not None:
      m = self.ix.classes[fn.file].get(fn.cls, {}).get(func.attr)
      return [(m, m.offset)] if m else []
    owner = None
    if isinstance(func.value, ast.Name):
      owner = self.ix.resolve(fn.file, func.value.id)
    elif isinstance(func.value, ast.Attribute) and isinstance(func.value.value, ast.Name):
      mod = self.ix.resolve(fn.file, func.value.value.id)  # package.Class.method
      if mod and mod[0] == "module":
        owner = self.ix.resolve(mod[1], func.value.attr)
    if owner and owner[0] == "module":
      return self._targets(self.ix.resolve(owner[1], func.attr))
    if owner and owner[0] == "class":
      m = self.ix.classes[owner[1][0]].get(owner[1][1], {}).get(func.attr)
      return [(m, m.offset)] if m else []
    if isinstance(func.value, ast.Name) and func.value.id in self.ix.imports[fn.file]:
      return []  # a library outside the scanned code
    return [(m, m.offset) for m in self.ix.methods.get(func.attr, [])]  # a method of an object of unknown class

  def _call(self, fn, node) -> set:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    args = [self._ev(fn, a) for a in node.args]
    kwargs = [(k.arg, self._ev(fn, k.value)) for k in node.keywords]
    for k, (_, paths) in zip(node.keywords, kwargs):
      if k.arg is None and paths:  # f(**cfg.section)
        self._whole(fn, k.value, paths)
    for a, paths in zip(node.args, args):
      if isinstance(a, ast.Starred) and paths:
        self._whole(fn, a, paths)
    key = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
    if isinstance(func, ast.Attribute):
      recv = self._ev(fn, func.value)
      if recv:
        if name == "get" or (name == "pop" and len(node.args) > 1):
          self._flag(fn, node, f".{name}()", key)
          return set()
        if name == "pop":
          if key is None:
            self._whole(fn, node, recv)
            return set()
          self._read(fn, node, recv, key)
          return self._sections(recv, key)
        if name == "update":  # x.update(y) stores every key of y into x; x.update(dict(k=...)) stores k
          literal = node.args[0] if node.args else None
          keys = [k.arg for k in node.keywords if k.arg]
          if isinstance(literal, ast.Call) and isinstance(literal.func, ast.Name) and literal.func.id == "dict":
            keys += [k.arg for k in literal.keywords if k.arg]
          elif isinstance(literal, ast.Dict):
            keys += [k.value for k in literal.keys if isinstance(k, ast.Constant)]
          for p in recv:
            self.copy_stores[p] |= set(args[0]) if args else set()
            for k in keys:
              self.stores[p + (k,)].add(self._where(fn, node))
          return set()
        if name in _WHOLE_METHODS:
          self._whole(fn, node, recv)
          return set()
        if name in _COPIES:
          return recv
        if name in _NOT_READS:
          return set()
    else:
      self._ev(fn, func)
    if name in ("getattr", "hasattr") and len(node.args) >= 2 and args[0]:
      key = node.args[1].value if isinstance(node.args[1], ast.Constant) else None
      if name == "hasattr" or len(node.args) > 2:
        self._flag(fn, node, f"{name}()", key)
        return set()
      if key is None:
        self._whole(fn, node, args[0])
        return set()
      self._read(fn, node, args[0], key)
      return self._sections(args[0], key)
    if name in _COPIES and args:
      return args[0]
    if name in _WHOLE_BUILTINS and args and args[0]:
      self._whole(fn, node, args[0])
      return set()
    out = set()
    for callee, offset in self._callees(fn, func):
      self._callers[callee].add(fn)
      for i, paths in enumerate(args):
        if paths and not isinstance(node.args[i], ast.Starred) and i + offset < len(callee.params):
          self._param(callee, callee.params[i + offset], paths)
      for k, paths in kwargs:
        if paths and k in callee.params:
          self._param(callee, k, paths)
      out |= self.returns[callee]
    return out

  def _param(self, callee, name, paths):
    if not paths <= self.env[callee][name]:
      self.env[callee][name] |= paths
      self._enqueue(callee)

  def _apply_aliases(self):
    """A config path stored from another (`job.model = copy.deepcopy(cfg.model)`) reads what is read of it."""
    for table in (self.reads, self.whole):
      changed = True
      while changed:
        changed = False
        for path, where in list(table.items()):
          for i in range(1, len(path) + 1):
            for src in self.aliases.get(path[:i], ()):
              target = src + path[i:]
              if not where <= table[target]:
                table[target] |= where
                changed = True


# ---------------------------------------------------------------------------------------------- configs
def _sources() -> dict[str, str]:
  out = {}
  for top in SCANNED:
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(root, name)
          with open(path, encoding="utf-8") as f:
            out[os.path.relpath(path, REPO)] = f.read()
  return out


def variants(name: str) -> list[str | None]:
  """None and every variant a config names in its error for an unknown one ("known: 'quick'", "known: [...]")."""
  try:
    load(f"{name}:__no_such_variant__")
  except ValueError as e:
    m = re.search(r"known: (.+)$", str(e))
    if m:
      known = ast.literal_eval(m.group(1))
      return [None] + ([known] if isinstance(known, str) else list(known))
  return [None]


def kind_of(name: str) -> str:
  kinds = [k for prefix, k in KIND_OF_PREFIX.items() if name.startswith(prefix)]
  assert len(kinds) == 1, f"configs/{name}.py: add its kind to KIND_OF_PREFIX (and its entry point to SEEDS)"
  return kinds[0]


def leaves(cfg, prefix=()) -> dict[tuple, object]:
  out = {}
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(leaves(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def section(cfg, path):
  for k in path:
    cfg = cfg[k]
  return cfg


def _fields(cls, drop=()) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - set(drop)


def _reader_options(cfg, path) -> set[str]:
  from zoomer_jax.eval.readers import ALIASES, READERS
  name = section(cfg, path[:-1]).name
  name = "original" if name == "synthetic" else ALIASES.get(name, name)
  params = inspect.signature(READERS[name]).parameters.values()
  return {p.name for p in params if p.kind == p.KEYWORD_ONLY} - {"by_group"}


def whole_consumers():
  """Sections the code takes whole, by the end of their path -> the keys their consumer takes (cfg, path)."""
  from zoomer_jax.agent.protocol import ToolConfig
  from zoomer_jax.agent.rollout import AgentConfig
  from zoomer_jax.data.synthetic import VideoParams
  from zoomer_jax.model.config import ModelConfig, TextConfig, VisionConfig
  from zoomer_jax.train.optim import _KNOWN as OPTIM_KEYS
  from zoomer_jax.agent.rewards import RewardConfig
  return {
      ("model",): lambda c, p: _fields(ModelConfig),
      ("model", "text"): lambda c, p: _fields(TextConfig),
      ("model", "vision"): lambda c, p: _fields(VisionConfig),
      ("optim",): lambda c, p: set(OPTIM_KEYS),  # sft's optim, grpo's actor.optim
      ("reward",): lambda c, p: _fields(RewardConfig, ["tool_call_max_frames", "tools"]),  # grpo passes the rollout's
      ("agent",): lambda c, p: _fields(ToolConfig),  # eval_*
      ("tool",): lambda c, p: _fields(ToolConfig),  # demo
      ("rollout",): lambda c, p: _fields(AgentConfig, ["tool", "sampling"]) | {"max_new_tokens"},  # eval_*
      ("data", "video"): lambda c, p: _fields(VideoParams),  # demo
      ("benchmark", "options"): _reader_options,  # eval_*: the reader's own keyword arguments
  }


NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
CONFIGS = [(n, v) for n in NAMES for v in variants(n)]


def _load(name, variant):
  return load(f"{name}:{variant}" if variant else name)


@functools.cache
def all_sections() -> frozenset[tuple]:
  """Every path that names a section in some config: only these hold configs (a leaf's value does not)."""
  return frozenset(p[:i] for n, v in CONFIGS for p in leaves(_load(n, v)) for i in range(1, len(p)))


@pytest.fixture(scope="module")
def index():
  return Index(_sources())


@pytest.fixture(scope="module")
def flows(index):
  return {kind: ConfigFlow(index, seeds, sections=all_sections()) for kind, seeds in SEEDS.items()}


def unread_knobs(cfg, kind: str, flow: ConfigFlow) -> list[str]:
  """Problems of one config: declared leaves nothing reads, sections taken whole whose keys differ from what
  their consumer takes, and declared leaves the code overwrites."""
  table, problems = whole_consumers(), []
  declared = leaves(cfg)
  sections = {p[:i] for p in declared for i in range(1, len(p))}
  for path in sorted(set(flow.whole) & (sections | {()})):
    rule = next((r for suffix, r in table.items() if path[-len(suffix):] == suffix), None)
    name = ".".join(path) or "<root>"
    if rule is None:
      problems.append(f"{name} is taken whole at {sorted(flow.whole[path])[0]}; add its consumer to whole_consumers")
      continue
    want, have = rule(cfg, path), set(section(cfg, path))
    if have - want:
      problems.append(f"{name} declares {sorted(have - want)}, which its consumer does not take")
    if want - have:
      problems.append(f"{name} does not declare {sorted(want - have)}, which its consumer reads")
  stores = {p: sorted(w) for p, w in flow.stores.items()}
  for dst, sources in flow.copy_stores.items():
    for src in sources:
      node = _section_or_none(cfg, src)
      for k in node or ():
        stores.setdefault(dst + (k,), [f"{'.'.join(dst)}.update({'.'.join(src)})"])
  for path in declared:
    whole = any(path[:i] in flow.whole for i in range(len(path)))
    if not whole and path not in flow.reads and path not in CLI_READS:
      problems.append(f"{'.'.join(path)} is declared and read by nothing")
    if path in stores and (kind, ".".join(path)) not in ALLOWED_STORES:
      problems.append(f"{'.'.join(path)} is declared and overwritten by the code at {stores[path]}")
  return problems


def _section_or_none(cfg, path):
  try:
    node = section(cfg, path)
  except (KeyError, AttributeError):
    return None
  return node if isinstance(node, ml_collections.ConfigDict) else None


# ---------------------------------------------------------------------------------------------- tests
def test_code_reads_no_undeclared_knob(index):
  """No `.get(key, default)`, `getattr(cfg, key, default)`, `hasattr` or `key in cfg` on a config."""
  flow = ConfigFlow(index, [s for seeds in SEEDS.values() for s in seeds], sections=all_sections(), from_load=True)
  bad = [f"{f}:{line}: {what} of {key!r}" for f, line, what, key in flow.undeclared
         if (f, key) not in ALLOWED_UNDECLARED]
  assert not bad, "config knobs read without being declared (declare them, then read them plainly):\n" + \
      "\n".join(bad)
  used = {(f, key) for f, _, _, key in flow.undeclared}
  assert set(ALLOWED_UNDECLARED) <= used, f"stale ALLOWED_UNDECLARED: {set(ALLOWED_UNDECLARED) - used}"
  assert CLI_READS <= {p for p, where in flow.reads.items() if any("__main__.py" in w for w in where)}


@pytest.mark.parametrize("name,variant", CONFIGS, ids=[f"{n}:{v}" if v else n for n, v in CONFIGS])
def test_every_declared_knob_is_read(name, variant, flows):
  cfg = _load(name, variant)
  problems = unread_knobs(cfg, kind_of(name), flows[kind_of(name)])
  assert not problems, f"configs/{name}.py" + (f":{variant}" if variant else "") + ":\n" + "\n".join(problems)


def test_allowed_stores_are_still_needed(flows):
  for kind, path in ALLOWED_STORES:
    assert tuple(path.split(".")) in flows[kind].stores, f"stale ALLOWED_STORES entry {kind}: {path}"


def test_a_bogus_knob_and_a_missing_field_are_caught(flows):
  """The checks can fail: an unread leaf, a field a whole-taken section lacks, an overwritten knob."""
  cfg = load("grpo_7b")
  cfg.actor.bogus_knob = 1
  cfg.rollout.workers_typo = 2
  del cfg.reward["penalize_mode"]
  problems = "\n".join(unread_knobs(cfg, "grpo", flows["grpo"]))
  assert "actor.bogus_knob is declared and read by nothing" in problems
  assert "rollout.workers_typo is declared and read by nothing" in problems
  assert "reward does not declare ['penalize_mode']" in problems
  demo = load("demo")
  demo.grpo.seed = 3  # the pipeline sets the GRPO job's seed from the demo's
  assert "grpo.seed is declared and overwritten" in "\n".join(unread_knobs(demo, "demo", flows["demo"]))


SNIPPET = '''
import json
from zoomer_jax.config_loader import load


def helper(section):
  return section.get("hidden", 4), getattr(section, "other", 1), hasattr(section, "x")


def job(path):
  cfg = load("grpo_7b")
  record = json.load(open(path))
  a, r = cfg.actor, cfg.rollout
  if "probe" in r:
    pass
  r.update(dict(temperature=0.5))
  cfg.seed = 1
  return helper(a), record.get("fine", 0), r.n
'''


def test_the_scan_flags_config_reads_and_not_json_reads():
  flow = ConfigFlow(Index({"zoomer_jax/config_loader.py": "def load(spec, overrides=()):\n  pass\n",
                           "zoomer_jax/snippet.py": SNIPPET}), sections={("actor",), ("rollout",)}, from_load=True)
  found = sorted((what, key) for _, _, what, key in flow.undeclared)
  assert found == [("'in' test", "probe"), (".get()", "hidden"), ("getattr()", "other"), ("hasattr()", "x")]
  assert ("rollout", "n") in flow.reads and ("actor",) in flow.reads
  assert set(flow.stores) == {("rollout", "temperature"), ("seed",)}
