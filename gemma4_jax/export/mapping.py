"""Tunix Gemma 4 LoRA parameters -> Hugging Face LoRA pairs.

qwix puts `<param>_lora_a` / `<param>_lora_b` next to each adapted weight;
their shapes follow the einsum of the layer (`a` takes the contracting dims,
`b` the others). This module turns each pair into the PEFT convention on the
Hugging Face weight: `W_hf[out, in] += scale * lora_b[out, r] @ lora_a[r, in]`.

Both Tunix layouts are handled: google-tunix 0.1.7 keeps
`per_layer_model_projection.w` as `[D, L, P]` (so `b` is `[r, L, P]`), the
current Tunix as `[D, L*P]` (`b` is `[r, L*P]`); Hugging Face stores
`[L*P, D]` either way. Tunix multiplies that weight by `embed_dim**-0.5` at
run time but qwix adds the LoRA term after the scaling, so the equivalent
change of the stored weight is the LoRA delta divided by that scale.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

LAYOUT_TUNIX_0_1_7 = "tunix-0.1.7"
LAYOUT_TUNIX_HEAD = "tunix-head"
LAYOUT_PEFT = "peft"
LM_HEAD = "lm_head"

_LAYER = r"layers\.(\d+)\."
# Tunix module path (without the `_lora_a/_lora_b` leaf) -> kind.
_PATTERNS = (
    (re.compile(_LAYER + r"attn\.q_einsum\.w$"), "q"),
    (re.compile(_LAYER + r"attn\.kv_einsum\.w$"), "kv"),
    (re.compile(_LAYER + r"attn\.k_einsum\.w$"), "k"),
    (re.compile(_LAYER + r"attn\.attn_vec_einsum\.w$"), "o"),
    (re.compile(_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.kernel$"),
     "mlp"),
    (re.compile(_LAYER + r"(per_layer_input_gate|per_layer_projection)\.w$"),
     "ple_layer"),
    (re.compile(r"embedder\.per_layer_model_projection\.w$"), "ple_model"),
    (re.compile(r"embedder\.input_embedding$"), "embedding"),
)


@dataclasses.dataclass(frozen=True)
class LoraDelta:
  """One adapted Hugging Face weight: `W += scale * lora_b @ lora_a`.

  `target` is the module path inside the text model
  (`layers.3.self_attn.q_proj`, `per_layer_model_projection`) or `lm_head`.
  """
  target: str
  lora_a: np.ndarray  # [r, in] float32
  lora_b: np.ndarray  # [out, r] float32, run-time weight scales folded in
  scale: float
  source: str

  @property
  def rank(self) -> int:
    return self.lora_a.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    return (self.lora_b.shape[0], self.lora_a.shape[1])

  @property
  def layer(self) -> int | None:
    m = re.match(r"layers\.(\d+)\.", self.target)
    return int(m.group(1)) if m else None


class AdapterMappingError(ValueError):
  """Adapter parameters that do not map onto Gemma 4."""


def pair_tunix_params(flat: dict[str, np.ndarray]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Groups `<path>_lora_a` / `<path>_lora_b` leaves by `<path>`."""
  pairs: dict[str, dict[str, np.ndarray]] = {}
  unknown = []
  for key, value in flat.items():
    m = re.fullmatch(r"(.+)_lora_([ab])", key)
    if not m:
      unknown.append(key)
      continue
    pairs.setdefault(m.group(1), {})[m.group(2)] = value
  if unknown:
    raise AdapterMappingError(
        f"adapter: {len(unknown)} parameter(s) are not qwix LoRA weights "
        f"(expected names ending in _lora_a/_lora_b): {', '.join(unknown[:5])}")
  incomplete = sorted(k for k, v in pairs.items() if len(v) != 2)
  if incomplete:
    raise AdapterMappingError(
        f"adapter: lora_a or lora_b missing for {', '.join(incomplete[:5])}")
  return {k: (v["a"], v["b"]) for k, v in pairs.items()}


def tunix_layout(pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
  """Which Tunix layout wrote the adapter (told apart by the PLE projection;
  without one the two layouts are identical)."""
  ple = pairs.get("embedder.per_layer_model_projection.w")
  if ple is not None and ple[1].ndim == 2:
    return LAYOUT_TUNIX_HEAD
  return LAYOUT_TUNIX_0_1_7


def tunix_rank(pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
  """The LoRA rank all pairs share (`a`'s last dim, `b`'s first)."""
  ranks = {}
  for path, (a, b) in pairs.items():
    if a.shape[-1] != b.shape[0]:
      raise AdapterMappingError(
          f"adapter: {path}: lora_a {list(a.shape)} and lora_b "
          f"{list(b.shape)} disagree on the rank")
    ranks.setdefault(int(a.shape[-1]), path)
  if len(ranks) != 1:
    raise AdapterMappingError(
        f"adapter: pairs have different ranks {sorted(ranks)} (e.g. "
        f"{', '.join(ranks.values())}); one rank per adapter is supported")
  return next(iter(ranks))


def tunix_to_deltas(pairs: dict[str, tuple[np.ndarray, np.ndarray]], *,
                    scale: float) -> list[LoraDelta]:
  """Maps every Tunix LoRA pair onto Hugging Face weights.

  Raises:
    AdapterMappingError: a path is not a Gemma 4 LoRA target, or its shapes
      do not fit the einsum of that layer.
  """
  deltas: list[LoraDelta] = []
  unknown = []
  for path, (a, b) in sorted(pairs.items()):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    kind, m = _classify(path)
    if kind is None:
      unknown.append(path)
      continue
    try:
      deltas.extend(_map_pair(kind, m, path, a, b, scale))
    except ValueError as e:
      raise AdapterMappingError(
          f"adapter: {path}: lora_a {list(a.shape)}, lora_b {list(b.shape)} "
          f"do not fit a Gemma 4 {kind} weight: {e}") from None
  if unknown:
    raise AdapterMappingError(
        f"adapter: {len(unknown)} LoRA target(s) are not Gemma 4 text-model "
        f"weights this tool knows (attention q/kv/k/o, MLP, per-layer input "
        f"gate/projection, per_layer_model_projection, input_embedding): "
        f"{', '.join(unknown[:8])}")
  return deltas


def _classify(path: str):
  for pattern, kind in _PATTERNS:
    m = pattern.match(path)
    if m:
      return kind, m
  return None, None


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


def _map_pair(kind, m, path, a, b, scale) -> list[LoraDelta]:
  r = a.shape[-1]
  pair = lambda target, la, lb: LoraDelta(  # pylint: disable=g-long-lambda
      target, np.ascontiguousarray(la), np.ascontiguousarray(lb), scale, path)
  if kind == "q":  # 'BTD,NDH->BTNH': a [D, r], b [r, N, H]; q_proj [N*H, D]
    _check(a.ndim == 2 and b.ndim == 3, "expected a [D, r], b [r, N, H]")
    return [pair(f"layers.{m.group(1)}.self_attn.q_proj", a.T,
                 b.reshape(r, -1).T)]
  if kind == "kv":  # 'BSD,CKDH->CBSKH': a [D, r], b [r, 2, K, H]; one shared A
    _check(a.ndim == 2 and b.ndim == 4 and b.shape[1] == 2,
           "expected a [D, r], b [r, 2, K, H]")
    layer = m.group(1)
    return [pair(f"layers.{layer}.self_attn.k_proj", a.T, b[:, 0].reshape(r, -1).T),
            pair(f"layers.{layer}.self_attn.v_proj", a.T, b[:, 1].reshape(r, -1).T)]
  if kind == "k":  # k_eq_v global layers: 'BSD,KDH->BSKH'
    _check(a.ndim == 2 and b.ndim == 3, "expected a [D, r], b [r, K, H]")
    return [pair(f"layers.{m.group(1)}.self_attn.k_proj", a.T,
                 b.reshape(r, -1).T)]
  if kind == "o":  # 'BTNH,NHD->BTD': a [N, H, r], b [r, D]; o_proj [D, N*H]
    _check(a.ndim == 3 and b.ndim == 2, "expected a [N, H, r], b [r, D]")
    return [pair(f"layers.{m.group(1)}.self_attn.o_proj", a.reshape(-1, r).T,
                 b.T)]
  if kind in ("mlp", "ple_layer"):  # kernel/w [in, out]; HF [out, in]
    _check(a.ndim == 2 and b.ndim == 2, "expected a [in, r], b [r, out]")
    prefix = "mlp." if kind == "mlp" else ""
    return [pair(f"layers.{m.group(1)}.{prefix}{m.group(2)}", a.T, b.T)]
  if kind == "ple_model":  # 'BTD,DNP->BTNP' or 'BTD,DX->BTX'; HF [L*P, D]
    _check(a.ndim == 2 and b.ndim in (2, 3),
           "expected a [D, r], b [r, L, P] or [r, L*P]")
    runtime_scale = float(a.shape[0]) ** -0.5
    return [pair("per_layer_model_projection", a.T,
                 b.reshape(r, -1).T / runtime_scale)]
  # Tied embedding: qwix adapts the decode `x @ E.T`, so a [D, r], b [r, V]
  # is a change of the output projection only.
  _check(a.ndim == 2 and b.ndim == 2, "expected a [D, r], b [r, V]")
  return [pair(LM_HEAD, a.T, b.T)]


def peft_module_to_target(module: str, prefix_candidates=(
    "model.language_model.", "language_model.model.", "language_model.",
    "model.")) -> str:
  """`model.language_model.layers.0.self_attn.q_proj` -> `layers.0...`."""
  if module == LM_HEAD or module.endswith("." + LM_HEAD):
    return LM_HEAD
  for prefix in prefix_candidates:
    if module.startswith(prefix):
      return module[len(prefix):]
  return module


__all__ = [
    "AdapterMappingError", "LAYOUT_PEFT", "LAYOUT_TUNIX_0_1_7",
    "LAYOUT_TUNIX_HEAD", "LM_HEAD", "LoraDelta", "pair_tunix_params",
    "peft_module_to_target", "tunix_layout", "tunix_rank", "tunix_to_deltas",
]
