"""Float32 reference LoRA: the frozen product plus a scaled low-rank product.

qwix puts LoRA on a weight used as `einsum(equation, x, w)` by splitting w's
axes in two: `lora_a` holds the axes w shares with x (contracted or batch),
in w's order, then the rank r; `lora_b` holds r, then w's remaining axes.
The output is `einsum(equation, x, w) + (alpha / rank) * einsum(x, lora_a,
lora_b)`, with `alpha / rank` applied after the low-rank product; dropout is
off (qwix's default rate 0 skips it). For `nnx.Linear`, `x @ kernel`, that is
`x @ w + scale * (x @ a) @ b`: `lora_matmul`.

Gemma 4's forms: `BTD,NDH->BTNH` (q), `BSD,CKDH->CBSKH` (kv), `BSD,KDH->BSKH`
(k when k == v), `BTNH,NHD->BTD` (attention output), `BTD,DNP->BTNP` and
`BTD,DX->BTX` (per-layer model projection, Tunix 0.1.7 and current),
`BTD,DP->BTP` (per-layer input gate), `BTP,PD->BTD` (per-layer projection).

`gemma4_jax.ops.lora` checks the ops' arguments; the checks here are the
ones this module's own tests call it for.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def lora_equation(equation: str) -> str:
  """qwix's LoRA einsum for a two-operand einsum.

  E.g. `"BTD,NDH->BTNH"` gives `"BTD,Dr,rNH->BTNH"`: `lora_a` is `[D, r]`
  and `lora_b` is `[r, N, H]`.
  """
  lhs, rhs, out = _parse_equation(equation)
  used = set(lhs + rhs + out)
  rank = "r" if "r" not in used else sorted(set(string.ascii_letters)
                                            - used)[0]
  a_axes = "".join(c for c in rhs if c in lhs)
  b_axes = "".join(c for c in rhs if c not in lhs)
  return f"{lhs},{a_axes}{rank},{rank}{b_axes}->{out}"


def lora_einsum(equation: str, x, w, lora_a, lora_b, *, scale):
  """`einsum(equation, x, w) + scale * einsum(x, lora_a, lora_b)`, float32.

  Args:
    equation: a two-operand einsum without ellipsis, e.g. `"BTD,NDH->BTNH"`.
    x: the input, one axis per letter of the equation's first operand.
    w: the frozen weight as the einsum sees it (after any runtime scale).
    lora_a: `[<w's axes shared with x>, r]`.
    lora_b: `[r, <w's other axes>]`.
    scale: `alpha / rank`.

  Returns:
    The einsum's output in x's dtype.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  lhs, rhs, _ = _parse_equation(equation)
  for name, array, axes in (("x", x, lhs), ("w", w, rhs)):
    if array.ndim != len(axes):
      raise ValueError(f"{name} must have rank {len(axes)} ({axes} in "
                       f"{equation!r}), got shape {array.shape}")
  size = dict(zip(rhs, w.shape))
  rank = lora_a.shape[-1] if lora_a.ndim else 0
  want_a = (*(size[c] for c in rhs if c in lhs), rank)
  want_b = (rank, *(size[c] for c in rhs if c not in lhs))
  if lora_a.shape != want_a or lora_b.shape != want_b:
    raise ValueError(
        f"for {equation!r} with w {w.shape}, lora_a must be {want_a} and "
        f"lora_b {want_b} ({lora_equation(equation)}), got lora_a "
        f"{lora_a.shape} and lora_b {lora_b.shape}")

  x32, w32, a32, b32 = (t.astype(jnp.float32) for t in (x, w, lora_a, lora_b))
  frozen = jnp.einsum(equation, x32, w32, precision=HIGHEST)
  delta = jnp.einsum(lora_equation(equation), x32, a32, b32,
                     precision=HIGHEST)
  return (frozen + scale * delta).astype(x.dtype)


def lora_matmul(x, w, a, b, *, scale, adapter_ids=None):
  """`x @ w + scale * (x @ a) @ b`, float32; one base, one or many adapters.

  Args:
    x: `[..., K]` (`[M, K]` in the ops contract).
    w: the frozen weight `[K, N]`.
    a: `[K, r]`, or `[n, K, r]` with `adapter_ids`.
    b: `[r, N]`, or `[n, r, N]` with `adapter_ids`.
    scale: `alpha / rank`.
    adapter_ids: optional integer `x.shape[:-1]` (`[M]`): row m uses adapter
      `adapter_ids[m]`, in `[0, n)`.

  Returns:
    `[..., N]` in x's dtype.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_floating(x)
  _check_scale(scale)
  if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x must be [..., K] and w [K, N] with the same K, got "
                     f"x {x.shape} and w {w.shape}")
  (k, n), r = w.shape, b.shape[-2] if b.ndim >= 2 else 0
  if adapter_ids is None:
    if a.shape != (k, r) or b.shape != (r, n):
      raise ValueError(f"a must be [K, r] and b [r, N] with K={k}, N={n}, got "
                       f"a {a.shape} and b {b.shape}")
  else:
    check_adapter_ids(adapter_ids, x)
    num = a.shape[0] if a.ndim == 3 else 0
    if a.shape != (num, k, r) or b.shape != (num, r, n):
      raise ValueError(f"with adapter_ids, a must be [n, K, r] and b [n, r, N] "
                       f"with K={k}, N={n}, got a {a.shape} and b {b.shape}")
    if not isinstance(adapter_ids, jax.core.Tracer):
      low, high = int(jnp.min(adapter_ids)), int(jnp.max(adapter_ids))
      if low < 0 or high >= num:
        raise ValueError(f"adapter_ids must lie in [0, {num}), got values in "
                         f"[{low}, {high}]")

  x32, w32, a32, b32 = (t.astype(jnp.float32) for t in (x, w, a, b))
  frozen = jnp.einsum("...k,kn->...n", x32, w32, precision=HIGHEST)
  if adapter_ids is None:
    down = jnp.einsum("...k,kr->...r", x32, a32, precision=HIGHEST)
    delta = jnp.einsum("...r,rn->...n", down, b32, precision=HIGHEST)
  else:
    a_rows = a32[adapter_ids]  # [..., K, r]
    b_rows = b32[adapter_ids]  # [..., r, N]
    down = jnp.einsum("...k,...kr->...r", x32, a_rows, precision=HIGHEST)
    delta = jnp.einsum("...r,...rn->...n", down, b_rows, precision=HIGHEST)
  return (frozen + scale * delta).astype(x.dtype)


def check_adapter_ids(adapter_ids, x) -> None:
  """Integer ids, one per row of `x` (`x.shape[:-1]`); `ops.lora_matmul`
  checks its ids with this too.

  Raises:
    TypeError: non-integer ids.
    ValueError: ids of another shape.
  """
  ids_dtype = getattr(adapter_ids, "dtype", None)
  if ids_dtype is None or not jnp.issubdtype(ids_dtype, jnp.integer):
    raise TypeError(f"adapter_ids must be an integer array, got dtype "
                    f"{ids_dtype}")
  if adapter_ids.shape != x.shape[:-1]:
    raise ValueError(f"adapter_ids must have shape x.shape[:-1] = "
                     f"{x.shape[:-1]}, got {adapter_ids.shape}")


def _parse_equation(equation):
  if not isinstance(equation, str):
    raise TypeError(f"equation must be a str, got {type(equation).__name__}")
  operands, arrow, out = equation.replace(" ", "").partition("->")
  lhs, comma, rhs = operands.partition(",")
  if not (arrow and comma and all(part.isalpha() for part in (lhs, rhs, out))
          and set(out) <= set(lhs + rhs)):
    raise ValueError(f"equation must look like 'BTD,NDH->BTNH' (two operands, "
                     f"letters only), got {equation!r}")
  return lhs, rhs, out


def _check_floating(x):
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"x must be a floating array, got dtype {dtype}")


def _check_scale(scale):
  if isinstance(scale, bool) or not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python number (alpha / rank), got "
                    f"{type(scale).__name__}")
