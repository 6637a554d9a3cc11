"""The agent's tools behind one seam (`base.Tool`): the temporal zoom and the spatial crop, chosen by name.

    tools = enabled(("zoom", "crop"))   # ToolConfig.tools; the config switch is rollout.tools / agent.tools
    tool = by_name(call.tool)           # the tool a parsed call belongs to
    tool = of_record(calls[0])          # the tool a trajectory's log record belongs to
    tool, call = logged_call(calls[0])  # ... and the call it records (None for a turn that did not parse)
"""

from __future__ import annotations

from typing import Sequence

from zoomer_jax.tools.base import IMAGE, CallError, Shown, Tool, frame_tags, inert
from zoomer_jax.tools.crop import CROP, CropCall
from zoomer_jax.tools.zoom import ZOOM, ZoomCall

REGISTRY: dict[str, Tool] = {t.name: t for t in (ZOOM, CROP)}
DEFAULT = ("zoom",)

__all__ = ["CROP", "DEFAULT", "IMAGE", "REGISTRY", "ZOOM", "CallError", "CropCall", "Shown", "Tool", "ZoomCall",
           "by_name", "enabled", "frame_tags", "inert", "logged_call", "of_record"]


def by_name(name: str) -> Tool:
  if name not in REGISTRY:
    raise ValueError(f"unknown tool {name!r}; known: {sorted(REGISTRY)}")
  return REGISTRY[name]


def enabled(names: Sequence[str]) -> tuple[Tool, ...]:
  """The tools named, in order; unknown, repeated or no names are refused."""
  if isinstance(names, str):
    raise TypeError(f"tools must be a sequence of tool names, got the string {names!r}")
  names = tuple(names)
  if not names:
    raise ValueError(f"at least one tool must be enabled; known: {sorted(REGISTRY)}")
  if len(set(names)) != len(names):
    raise ValueError(f"tools {names} name a tool twice")
  return tuple(by_name(n) for n in names)


def of_record(record: dict) -> Tool:
  """The tool of a call record (`Tool.log`); records written before tools had names are the zoom's."""
  return by_name(record.get("tool", ZOOM.name))


def logged_call(record: dict) -> tuple[Tool, object] | None:
  """(tool, call) of a call record that names a parsed call (shown, or failed on the host), None for the record
  of a call the protocol refused."""
  if "tool" in record and record["tool"] is None:  # the turn named several tools
    return None
  tool = of_record(record)
  if not all(k in record for k in tool.fields):
    return None
  return tool, tool.from_log(record)
