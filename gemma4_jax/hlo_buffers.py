"""Which buffers a compiled program holds at its peak, from its scheduled HLO.

`memory_analysis()` gives one number for a program's temporaries. To find
what to remat, offload or shard, one needs the buffers behind that number.
XLA:TPU's own buffer assignment is not exposed through JAX, so this module
replays the schedule of the entry computation (`compiled.as_text()` is the
scheduled module: instructions in execution order) with a simple liveness
rule: a buffer lives from the instruction that defines it to its last use,
views (`get-tuple-element`, `bitcast`, `tuple`, async `-done`, `while`)
extend the life of what they view, and only HBM buffers count (memory space
0; sizes padded to the layout's tile as TPU stores them).

It is an estimate: XLA may share or split buffers in ways this rule does not
model, and temporaries inside called computations (fusions' scratch, loop
bodies) are not counted. `fit` prints the estimate's peak next to XLA's
`temp_size_in_bytes`, so how close it is shows in every report.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
# dtype[dims]{layout}: the layout is optional.
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = ")
_NAME = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Instructions whose result is a view of their operands: no new buffer.
_VIEWS = {"get-tuple-element", "bitcast", "tuple", "while", "opt-barrier",
          "optimization-barrier", "conditional"}
_NOT_TEMPORARY = {"parameter", "constant"}


@dataclasses.dataclass(frozen=True)
class Buffer:
  """One HBM buffer: the instruction that defines it and what it holds."""
  name: str
  opcode: str
  shape: str
  bytes: int
  op_name: str
  defined: int
  last_use: int


@dataclasses.dataclass(frozen=True)
class Peak:
  """The schedule step where live temporaries are largest, and them."""
  bytes: int
  step: int
  buffers: tuple[Buffer, ...]   # live at `step`, largest first


def array_bytes(dtype: str, dims: str, layout: str | None) -> int | None:
  """Bytes of one array as TPU lays it out, or None when it is not in HBM."""
  if dtype not in _DTYPE_BYTES:
    return None
  shape = [int(d) for d in dims.split(",") if d]
  if layout:
    if re.search(r"S\((\d+)\)", layout) and not re.search(r"S\(0\)", layout):
      return None   # VMEM, SMEM or host memory
    minor_to_major = re.match(r"\{([0-9,]*)", layout).group(1)
    tile = re.search(r"T\(([0-9,]+)\)", layout)
    if tile and minor_to_major:
      order = [int(d) for d in minor_to_major.split(",")][::-1]
      physical = [shape[d] for d in order]
      tile_dims = [int(t) for t in tile.group(1).split(",")]
      for i, t in enumerate(tile_dims[::-1], start=1):
        if i <= len(physical):
          physical[-i] = -(-physical[-i] // t) * t
      shape = physical
  return math.prod(shape) * _DTYPE_BYTES[dtype]


def _split_definition(line: str):
  """(name, shape text, opcode, rest) of an HLO instruction line."""
  match = _DEFINITION.match(line)
  if not match:
    return None
  body = line[match.end():]
  if body.startswith("("):
    depth = 0
    for end, char in enumerate(body):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    shape, rest = body[:end + 1], body[end + 1:].lstrip()
  else:
    shape, _, rest = body.partition(" ")
  opcode = rest.split("(", 1)[0]
  return match.group(1), shape, opcode, rest[len(opcode):]


def _entry_lines(hlo_text: str) -> list[str]:
  lines = hlo_text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
  end = next(i for i in range(start + 1, len(lines))
             if lines[i].startswith("}"))
  return lines[start + 1:end]


def _top_level(shape: str) -> list[str]:
  """The element shapes of a tuple shape (one level), or [shape]."""
  if not shape.startswith("("):
    return [shape]
  elements, depth, start = [], 0, 1
  for i, char in enumerate(shape):
    if char in "({[":
      depth += 1
    elif char in ")}]":
      depth -= 1
    if (char == "," and depth == 1) or (char == ")" and depth == 0):
      element = re.sub(r"/\*index=\d+\*/", "", shape[start:i]).strip()
      if element:
        elements.append(element)
      start = i + 1
  return elements


def buffers(hlo_text: str) -> list[Buffer]:
  """Every HBM temporary of the entry computation with its live range.

  A tuple-shaped result is one buffer per element, as XLA assigns them, so
  that an element read late does not keep its siblings alive.
  """
  parsed = [p for p in map(_split_definition, _entry_lines(hlo_text)) if p]
  index = {name: i for i, (name, *_) in enumerate(parsed)}
  shapes = {name: shape for name, shape, *_ in parsed}
  # Which buffers a value is made of: a view's are its operands'; a tuple
  # result's are its elements ("name#i").
  owners: dict[str, list[str]] = {}
  elements: dict[str, list[str]] = {}
  last_use: dict[str, int] = {}
  result = {}
  root = parsed[-1][0] if parsed else None

  def owned(value: str) -> list[str]:
    return owners.get(value, elements.get(value, [value]))

  for step, (name, shape, opcode, rest) in enumerate(parsed):
    operands = [n for n in _NAME.findall(rest.split("), ", 1)[0] + ")")
                if n in index and index[n] < step]
    for operand in operands:
      for owner in owned(operand):
        last_use[owner] = step
    if opcode == "get-tuple-element" and operands:
      k = int(re.search(r"index=(\d+)", rest).group(1))
      parts = owned(operands[0])
      owners[name] = [parts[k]] if k < len(parts) else parts
      continue
    if opcode in _VIEWS or opcode.endswith("-done"):
      owners[name] = [o for operand in operands for o in owned(operand)]
      continue
    if opcode in _NOT_TEMPORARY:
      continue
    op_name = _OP_NAME.search(rest)
    op_name = op_name.group(1) if op_name else ""
    parts = _top_level(shape)
    if len(parts) > 1 or shape.startswith("("):
      elements[name] = [f"{name}#{i}" for i in range(len(parts))]
    operand_arrays = [a for o in operands for a in _ARRAY.findall(shapes[o])]
    for i, part in enumerate(parts):
      arrays = _ARRAY.findall(part)
      if opcode.endswith("-start") and arrays and arrays[0] in operand_arrays:
        operand_arrays.remove(arrays[0])   # the operand, viewed
        continue
      size = sum(b for a in arrays if (b := array_bytes(*a)) is not None)
      if size:
        key = elements[name][i] if name in elements else name
        result[key] = (opcode, part, size, op_name, step)
  outputs = set(owned(root)) if root else set()
  return [Buffer(name, opcode, shape, size, op_name, defined,
                 last_use.get(name, defined))
          for name, (opcode, shape, size, op_name, defined) in result.items()
          if name not in outputs]


def peak(hlo_text: str) -> Peak:
  """The step with the most live temporary bytes and what is live there."""
  found = buffers(hlo_text)
  if not found:
    return Peak(0, 0, ())
  steps = max(b.last_use for b in found) + 2
  delta = [0] * steps
  for b in found:
    delta[b.defined] += b.bytes
    delta[b.last_use + 1] -= b.bytes
  live, best, best_step = 0, -1, 0
  for step, change in enumerate(delta):
    live += change
    if live > best:
      best, best_step = live, step
  at_peak = sorted((b for b in found if b.defined <= best_step <= b.last_use),
                   key=lambda b: -b.bytes)
  return Peak(best, best_step, tuple(at_peak))


def describe(op_name: str, width: int = 90) -> str:
  """The JAX op path of a buffer, shortened from the left to `width`."""
  return op_name if len(op_name) <= width else "..." + op_name[-width + 3:]
