"""Argument checks shared by the public ops, the export tool and the CLI.

Every check raises at the public boundary with a message that names the
argument (or flag, or file and field), what was expected and what was
given. They look only at Python values, shapes and dtypes, never at array
contents, so they work the same eagerly and under `jax.jit` tracing.

`bool` is a subclass of `int` in Python, so `True` passes `isinstance(x,
int)`; a number argument given a bool is refused here rather than used as 1.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Callable

import numpy as np


def is_array(value) -> bool:
  """An array the ops can take: anything with a `shape` and a `dtype`
  (jax and numpy arrays, tracers, `jax.ShapeDtypeStruct`)."""
  return hasattr(value, "shape") and hasattr(value, "dtype")


def check_array(name: str, value, *, what: str = "an array") -> None:
  """Refuses lists, tuples, scalars and None where an array is expected.

  A list is refused rather than converted: its dtype would be guessed
  (Python floats become float32 or float64 depending on `jax_enable_x64`).
  """
  if not is_array(value):
    raise TypeError(f"{name} must be {what} (a jax.Array or numpy.ndarray), "
                    f"got {type(value).__name__}; convert it with "
                    f"jnp.asarray first")



def check_floating(name: str, value, *, ndim: int, form: str) -> None:
  """An array of `ndim` dims and a floating dtype; `form` names the shape
  expected in the message (e.g. `"4-D ([B,T,N,H])"`, `"[B, T, D]"`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  check_array(name, value)
  if getattr(value, "ndim", None) != ndim:
    raise ValueError(f"{name} must be {form}, got shape "
                     f"{getattr(value, 'shape', type(value).__name__)}")
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating, got {value.dtype}")

def check_bool(name: str, value) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_int(name: str, value, *, minimum: int | None = None,
              allow_none: bool = False) -> None:
  """A Python or numpy integer (not a bool), at least `minimum`.

  Raises:
    TypeError: not a real number (a bool, a string, an array).
    ValueError: a real number that is not an integer, or below `minimum`.
  """
  if value is None and allow_none:
    return
  kind = f"an int{' or None' if allow_none else ''}"
  if isinstance(value, (bool, np.bool_)) or not isinstance(value,
                                                           numbers.Real):
    raise TypeError(f"{name} must be {kind}, got {value!r} "
                    f"({type(value).__name__})")
  if not isinstance(value, numbers.Integral):  # a number, but 2.5 is no size
    raise ValueError(f"{name} must be {kind}, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_number(name: str, value, *, positive: bool = False,
                 allow_none: bool = False, what: str = "") -> None:
  """A finite real Python or numpy number (not a bool), > 0 if `positive`.

  nan and inf are refused: as a scale or softcap they turn every output
  into nan (or a constant) without a word.
  """
  if value is None and allow_none:
    return
  kind = ("a positive" if positive else "a") + " Python number (finite"
  kind += f"; {what})" if what else ")"
  kind += " or None" if allow_none else ""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value,
                                                           numbers.Real):
    raise TypeError(f"{name} must be {kind}, got {value!r} "
                    f"({type(value).__name__})")
  if not math.isfinite(value) or (positive and not value > 0):
    raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_mesh_axes(op: str, argument: str, axes, mesh) -> None:
  """Every mesh axis named in `axes` (a spec: names, None or tuples of
  names) exists in `mesh`; an axis the mesh lacks is an error, never a
  silent replication."""
  names = []
  for entry in axes:
    if entry is None:
      continue
    for axis in (entry,) if isinstance(entry, str) else tuple(entry):
      if not isinstance(axis, str):
        raise TypeError(f"{op}: {argument} entries must be mesh axis names, "
                        f"None or tuples of names, got {entry!r}")
      names.append(axis)
  missing = [a for a in names if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"{op}: {argument} {tuple(axes)!r} names mesh axes "
                     f"{missing} that the mesh does not have (mesh axes: "
                     f"{tuple(mesh.axis_names)})")


def check_mesh(op: str, mesh) -> None:
  """`mesh` is a jax `Mesh` or `AbstractMesh` (or None)."""
  if mesh is not None and not (hasattr(mesh, "axis_names") and
                               hasattr(mesh, "shape")):
    raise TypeError(f"{op}: mesh must be a jax.sharding.Mesh or None, got "
                    f"{type(mesh).__name__}")


def has_empty_dim(*shapes) -> bool:
  return any(0 in tuple(shape) for shape in shapes)



def load_json(path: str | os.PathLike,
              error: Callable[[Exception], Exception]):
  """The JSON value in the file `path`. A file that is not valid JSON (or
  not UTF-8) raises `error(e)` with the parser's exception `e`, so that each
  caller names the file and what it is in its own words."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(e) from None

def json_object(value, where: str) -> dict:
  """`value` parsed from a JSON file must be an object (a dict)."""
  if not isinstance(value, dict):
    raise ValueError(f"{where}: expected a JSON object, got "
                     f"{_json_type(value)}")
  return value


def json_field(container: dict, field: str, where: str, *, kind: str,
               positive: bool = False, required: bool = False):
  """`container[field]` of a JSON file, checked like an argument.

  Args:
    container: the parsed object.
    field: the key.
    where: the file (and object) for messages.
    kind: "int", "number", "str", "bool" or "list".
    positive: numbers must be > 0 (and finite).
    required: a missing (or null) field is an error, else None is returned.
  """
  value = container.get(field)
  if value is None:
    if required:
      raise ValueError(f"{where}: missing field {field!r}")
    return None
  expected = {"int": "an integer", "number": "a number", "str": "a string",
              "bool": "true or false", "list": "a list"}[kind]
  if positive:
    expected = f"a positive {'integer' if kind == 'int' else 'number'}"
  ok = {
      "int": isinstance(value, int) and not isinstance(value, bool),
      "number": isinstance(value, (int, float)) and
                not isinstance(value, bool) and math.isfinite(value),
      "str": isinstance(value, str),
      "bool": isinstance(value, bool),
      "list": isinstance(value, list),
  }[kind]
  if ok and positive and not value > 0:
    ok = False
  if not ok:
    raise ValueError(f"{where}: field {field!r} must be {expected}, got "
                     f"{value!r}")
  return value


def _json_type(value) -> str:
  return {dict: "an object", list: "a list", str: "a string",
          bool: "a boolean", type(None): "null"}.get(
              type(value), f"a {type(value).__name__}")


def check_input_dir(flag: str, path: str | os.PathLike) -> None:
  """`path` is an existing directory."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{flag}: {path!r} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"{flag}: {path!r} is not a directory")
