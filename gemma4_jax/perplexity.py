"""Perplexity and top-k next-token inspection of Gemma 4, without logits.

What is computed (Gemma 4 softcaps its final logits, c = 30): the model's
next-token distribution is `softmax(c * tanh(h @ E^T / c))`, the one it
samples from at temperature 1. The mean NLL is the average over scored
tokens of `-log` of that probability of the actual next token, and the
perplexity is `exp(mean NLL)`; the raw, uncapped `h @ E^T` is never used.
Scored tokens: every token after the first for a `text` example; only the
`completion` tokens (each predicted from the prompt and the completion
before it) for a `prompt`/`completion` example.

The LM head runs fused in `gemma4_jax.ops.softcapped_cross_entropy` and
top-k in `kernels.loss.top_k`: the `[T, V]` logits are never held. A
checkpoint is loaded with Tunix's own safetensors loader; an adapter is
merged into the base by `gemma4_jax.export` (into a temporary directory), so
the adapted numbers are those of the merged checkpoint one would deploy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
# Examples are padded up to a power of two (at least this) so that few
# lengths are compiled.
MIN_PADDED_LENGTH = 16
DEFAULT_BATCH_SIZE = 8


class DatasetError(ValueError):
  """A dataset line that is not what `perplexity` expects."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example.

  `tokens [T]` int32; `scored [T]` bool: position t is scored when token t
  is predicted (so `scored[0]` is always False).
  """
  tokens: np.ndarray
  scored: np.ndarray


@dataclasses.dataclass(frozen=True)
class Result:
  """Token-level totals over a dataset."""
  nll_sum: float
  num_tokens: int
  num_examples: int

  @property
  def mean_nll(self) -> float:
    return self.nll_sum / self.num_tokens if self.num_tokens else math.nan

  @property
  def perplexity(self) -> float:
    return math.exp(self.mean_nll) if self.num_tokens else math.nan


def jsonl_objects(path: str | os.PathLike, *, error=DatasetError,
                  missing=DatasetError):
  """Yields `(where, record)` for each non-blank line of a JSONL file, each
  record a JSON object; `where` is "file:line".

  Raises:
    `missing`: the path does not exist; `error`: a directory, a line that
    is not UTF-8, not JSON or not an object (naming file and line).
  """
  if os.path.isdir(path):
    raise error(f"--data: {os.fspath(path)!r} is a directory, not a JSONL "
                "file")
  if not os.path.exists(path):
    raise missing(f"--data: {os.fspath(path)!r} does not exist")
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      where = f"{os.fspath(path)}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e})") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{where}: not a JSON object ({e})") from None
      if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got "
                    f"{type(record).__name__}")
      yield where, record


def read_dataset(path: str | os.PathLike) -> list[dict]:
  """JSONL records with `text`, or `prompt` and `completion` (strings).

  Raises:
    DatasetError: naming the file and line of the first bad record.
  """
  records = []
  for where, record in jsonl_objects(path):
    if "text" in record:
      fields = ("text",)
    elif "prompt" in record and "completion" in record:
      fields = ("prompt", "completion")
    else:
      raise DatasetError(
          f"{where}: expected a 'text' field, or 'prompt' and "
          f"'completion' fields; got {sorted(record)}")
    for field in fields:
      if not isinstance(record[field], str):
        raise DatasetError(f"{where}: field {field!r} must be a string, "
                           f"got {type(record[field]).__name__}")
    records.append({field: record[field] for field in fields})
  return records


def load_tokenizer(checkpoint_dir: str | os.PathLike):
  """The checkpoint's own `tokenizer.json` (`tokenizers` library)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  path = os.path.join(checkpoint_dir, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint: no {TOKENIZER_FILE} in "
                            f"{os.fspath(checkpoint_dir)}")
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the Rust library raises a bare Exception
    raise ValueError(f"checkpoint: {path} is not a tokenizers file: "
                     f"{e}") from None


def tokenize(records: Iterable[dict], tokenizer, *,
             chat: bool = False) -> list[Example]:
  """Examples from `read_dataset` records.

  `text` is encoded with the tokenizer's special tokens (e.g. BOS); a
  completion is encoded without them and appended to its prompt's tokens.
  With `chat`, prompt/completion records are in Gemma 4's turn format
  (`gemma4_jax.chat.encode_example`, as the fine-tuning script trains);
  `text` records are then refused.

  Raises:
    DatasetError: a `text` record with `chat`.
  """
  from gemma4_jax import chat as chat_lib  # pylint: disable=g-import-not-at-top
  examples = []
  for number, record in enumerate(records):
    if chat:
      if "text" in record:
        raise DatasetError(f"example {number}: --chat scores prompt/"
                           "completion records; this one is 'text'")
      tokens, scored = chat_lib.encode_example(
          tokenizer, record["prompt"], record["completion"], chat=True)
      tokens, scored = tokens.tolist(), scored.tolist()
    elif "text" in record:
      tokens = tokenizer.encode(record["text"]).ids
      scored = [True] * len(tokens)
    else:
      prompt = tokenizer.encode(record["prompt"]).ids
      completion = tokenizer.encode(record["completion"],
                                    add_special_tokens=False).ids
      tokens = prompt + completion
      scored = [False] * len(prompt) + [True] * len(completion)
    if scored:
      scored[0] = False  # the first token has nothing to be predicted from
    examples.append(Example(np.asarray(tokens, np.int32),
                            np.asarray(scored, bool)))
  return examples


def tunix_config(checkpoint_dir: str | os.PathLike, *, dtype="float32"):
  """A Tunix Gemma 4 `ModelConfig` from a Hugging Face `config.json`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tunix.models.gemma4 import model as gemma4_lib  # pylint: disable=g-import-not-at-top
  text = read_text_config(checkpoint_dir)
  layer_types = text["layer_types"]
  kinds = {"full_attention": gemma4_lib.AttentionType.GLOBAL,
           "sliding_attention": gemma4_lib.AttentionType.LOCAL_SLIDING}
  unknown = sorted(set(layer_types) - set(kinds))
  if unknown:
    raise ValueError(f"{CONFIG_FILE}: unknown layer_types {unknown}")
  rope = text.get("rope_parameters") or {}
  num_layers = text["num_hidden_layers"]
  dtype = jnp.dtype(dtype)
  return gemma4_lib.ModelConfig(
      num_layers=num_layers, num_embed=text["vocab_size"],
      embed_dim=text["hidden_size"], hidden_dim=text["intermediate_size"],
      num_heads=text["num_attention_heads"], head_dim=text["head_dim"],
      num_kv_heads=text["num_key_value_heads"],
      num_global_kv_heads=text.get("num_global_key_value_heads"),
      global_key_size=text.get("global_head_dim") or text["head_dim"],
      final_logit_softcap=text.get("final_logit_softcapping"),
      sliding_window_size=text.get("sliding_window"),
      per_layer_input_dim=text.get("hidden_size_per_layer_input") or 0,
      attention_pattern=tuple(kinds[t] for t in layer_types),
      frac_shared_layers=text.get("num_kv_shared_layers", 0) / num_layers,
      k_eq_v_global=bool(text.get("attention_k_eq_v", False)),
      override_kv_shared_ffw_hidden=(2 * text["intermediate_size"]
                                     if text.get("use_double_wide_mlp")
                                     else None),
      global_rope_proportion=rope.get("full_attention", {}).get(
          "partial_rotary_factor", 0.25),
      local_base_frequency=int(rope.get("sliding_attention", {}).get(
          "rope_theta", 10_000)),
      global_base_frequency=int(rope.get("full_attention", {}).get(
          "rope_theta", 1_000_000)),
      param_dtype=dtype, dtype=dtype)


# Fields of config.json (or its text_config) that `tunix_config` needs,
# all positive integers except layer_types.
_REQUIRED_SIZES = ("num_hidden_layers", "vocab_size", "hidden_size",
                   "intermediate_size", "num_attention_heads", "head_dim",
                   "num_key_value_heads")


def read_text_config(checkpoint_dir: str | os.PathLike) -> dict:
  """The checkpoint's Gemma 4 text config, every field `tunix_config`
  reads checked (before any model is built).

  Raises:
    FileNotFoundError: no config.json; ValueError: naming file and field.
  """
  from gemma4_jax import validation  # pylint: disable=g-import-not-at-top
  path = os.path.join(checkpoint_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint: no {CONFIG_FILE} in "
                            f"{os.fspath(checkpoint_dir)}")
  config = validation.load_json(path, lambda e: ValueError(
      f"checkpoint: {path} is not valid JSON: {e}"))
  validation.json_object(config, path)
  text = config.get("text_config") or config
  where = path + (": text_config" if text is not config else "")
  validation.json_object(text, where)
  for field in _REQUIRED_SIZES:
    validation.json_field(text, field, where, kind="int", positive=True,
                          required=True)
  layer_types = validation.json_field(text, "layer_types", where,
                                      kind="list", required=True)
  if len(layer_types) != text["num_hidden_layers"]:
    raise ValueError(f"{where}: layer_types has {len(layer_types)} entries "
                     f"but num_hidden_layers is {text['num_hidden_layers']}")
  known = ("full_attention", "sliding_attention")
  unknown = sorted({repr(t) for t in layer_types if t not in known})
  if unknown:
    raise ValueError(f"{where}: unknown layer_types {unknown}; expected "
                     f"{known}")
  for field in ("final_logit_softcapping", "sliding_window"):
    validation.json_field(text, field, where, kind="number", positive=True)
  shared = validation.json_field(text, "num_kv_shared_layers", where,
                                 kind="int")
  if shared is not None and not 0 <= shared < text["num_hidden_layers"]:
    raise ValueError(f"{where}: num_kv_shared_layers must be in [0, "
                     f"num_hidden_layers), got {shared}")
  return text


def load_model(checkpoint_dir: str | os.PathLike, *, dtype="float32",
               mesh=None):
  """A Tunix Gemma 4 from a Hugging Face checkpoint (Tunix's loader; with
  `mesh`, the weights are sharded by Tunix's `('fsdp', 'tp')` shardings)."""
  from tunix.models.gemma4 import params_safetensors  # pylint: disable=g-import-not-at-top
  config = tunix_config(checkpoint_dir, dtype=dtype)
  return params_safetensors.create_model_from_safe_tensors(
      os.fspath(checkpoint_dir), config, mesh)


@contextlib.contextmanager
def merged_checkpoint(checkpoint_dir: str | os.PathLike, adapter, *,
                      alpha: float | None = None):
  """Yields a temporary directory with `adapter` (a path or a loaded
  `export.adapter.Adapter`) merged into the base."""
  from gemma4_jax.export import merging  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="gemma4_jax_ppl_") as tmp:
    out = os.path.join(tmp, "merged")
    merging.merge(checkpoint_dir, adapter, out, alpha=alpha, progress=False)
    yield out


def _padded_length(length: int) -> int:
  return max(MIN_PADDED_LENGTH, 1 << max(0, length - 1).bit_length())


def _batch(examples: Sequence[Example], rows: int | None = None):
  """Examples as a right-padded batch of `rows` (default: one per example;
  extra rows are empty and score nothing), and Tunix's inputs."""
  from tunix.sft import utils as sft_utils  # pylint: disable=g-import-not-at-top
  rows = len(examples) if rows is None else rows
  length = _padded_length(max(len(e.tokens) for e in examples))
  tokens = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), bool)
  scored = np.zeros((rows, length), bool)
  for r, example in enumerate(examples):
    n = len(example.tokens)
    tokens[r, :n], mask[r, :n], scored[r, :n] = (example.tokens, True,
                                                 example.scored)
  return (tokens, scored, sft_utils.build_positions_from_mask(mask),
          sft_utils.make_causal_attn_mask(mask))


def _hidden_fn():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma4_jax.patches import tunix_loss  # pylint: disable=g-import-not-at-top

  @nnx.jit
  def hidden(model, tokens, positions, attention_mask):
    out = tunix_loss.final_hidden(model, tokens, positions, attention_mask)
    return out.astype(model.config.dtype)
  return hidden


def perplexity(model, examples: Sequence[Example], *, progress=None,
               implementation: str | None = None,
               description: str = "perplexity",
               batch_size: int = DEFAULT_BATCH_SIZE, mesh=None) -> Result:
  """Token-level NLL over `examples` (see the module docstring).

  Examples of one padded length share batches of `batch_size` rows (rows
  are independent: padding is masked and scores nothing).

  Args:
    model: a Tunix Gemma 4 (with or without qwix LoRA).
    examples: from `tokenize`.
    progress: show a tqdm bar (None: only on a terminal).
    implementation: for `ops.softcapped_cross_entropy`.
    description: the progress bar's label.
    batch_size: rows per batch (rounded up to a multiple of the mesh's
      `fsdp` size).
    mesh: a `('fsdp', 'tp')` mesh (`gemma4_jax.mesh`): rows are split over
      `fsdp`; the model keeps the shardings it was loaded with.

  Returns:
    A `Result`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from gemma4_jax import ops  # pylint: disable=g-import-not-at-top

  hidden_fn = _hidden_fn()
  softcap = model.config.final_logit_softcap

  @jax.jit
  def nll(hidden, embedding, tokens, scored):
    return ops.softcapped_cross_entropy(
        hidden[:, :-1], embedding, tokens[:, 1:], scored[:, 1:],
        softcap=softcap, implementation=implementation)

  embedding = jnp.asarray(model.embedder.input_embedding.value,
                          model.config.dtype)
  if batch_size < 1:
    raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
  batch_size = _rows_per_batch(batch_size, len(examples), mesh)
  total, count = 0.0, 0
  bar = tqdm.tqdm(total=len(examples), desc=description, unit="example",
                  disable=(not progress) if progress is not None else None)
  scope = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with scope, bar:
    for group in _length_batches(examples, batch_size):
      # Every batch has batch_size rows (one compile per padded length).
      inputs = _batch(group, rows=batch_size)
      if mesh is not None:
        inputs = _split_rows(inputs, mesh)
      tokens, scored, positions, attention_mask = inputs
      hidden = hidden_fn(model, tokens, positions, attention_mask)
      loss_sum, weight_sum = nll(hidden, embedding, tokens, scored)
      total += float(loss_sum)
      count += int(round(float(weight_sum)))
      bar.update(len(group))
  return Result(total, count, len(examples))


def _rows_per_batch(batch_size: int, num_examples: int, mesh) -> int:
  """No more rows than examples; with a mesh, a multiple of its `fsdp`
  size."""
  batch_size = min(batch_size, max(1, num_examples))
  if mesh is not None:
    from gemma4_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    fsdp = mesh.shape.get(mesh_lib.FSDP, 1)
    batch_size = -(-batch_size // fsdp) * fsdp
  return batch_size


def _length_batches(examples: Sequence[Example], batch_size: int
                    ) -> list[list[Example]]:
  """Groups of at most `batch_size` examples of one padded length, shortest
  first."""
  by_length = {}
  for example in examples:
    by_length.setdefault(_padded_length(len(example.tokens)),
                         []).append(example)
  return [group[i:i + batch_size] for _, group in sorted(by_length.items())
          for i in range(0, len(group), batch_size)]


def _split_rows(inputs, mesh):
  """The batch's arrays placed with their rows split over `fsdp`."""
  import jax  # pylint: disable=g-import-not-at-top
  from gemma4_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  rows = jax.sharding.NamedSharding(mesh,
                                    jax.sharding.PartitionSpec(mesh_lib.FSDP))
  return tuple(jax.device_put(x, rows) for x in inputs)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Top-k next tokens of one example: row t predicts token t + 1.

  `ids`/`probs` `[T - 1, k]`, most likely first; `target_probs [T - 1]` is
  the probability of the actual next token.
  """
  ids: np.ndarray
  probs: np.ndarray
  target_probs: np.ndarray


def top_k(model, example: Example, k: int) -> TopK:
  """Streaming top-k over vocab chunks at every position of `example`.

  Raises:
    ValueError: k not in [1, V], or an example of fewer than 2 tokens.
  """
  if len(example.tokens) < 2:
    raise ValueError("top_k: the example needs at least 2 tokens, got "
                     f"{len(example.tokens)}")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gemma4_jax.kernels.loss import top_k as top_k_lib  # pylint: disable=g-import-not-at-top

  tokens, _, positions, attention_mask = _batch([example])
  length = len(example.tokens)
  hidden = _hidden_fn()(model, tokens, positions, attention_mask)[
      0, :length - 1]
  embedding = jnp.asarray(model.embedder.input_embedding.value,
                          model.config.dtype)
  softcap = model.config.final_logit_softcap

  @functools.partial(jax.jit, static_argnames=("k",))
  def inspect(hidden, embedding, targets, k):
    ids, probs, log_z = top_k_lib.top_k_next_tokens(hidden, embedding, k,
                                                    softcap=softcap)
    # The actual next token's logit: one row of E per position.
    z = jnp.einsum("td,td->t", hidden.astype(jnp.float32),
                   embedding[targets].astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    if softcap is not None:
      z = softcap * jnp.tanh(z / softcap)
    return ids, probs, jnp.exp(z - log_z)

  ids, probs, target_probs = inspect(hidden, embedding,
                                     jnp.asarray(example.tokens[1:]), k)
  return TopK(np.asarray(ids), np.asarray(probs), np.asarray(target_probs))


def run(checkpoint: str, data: str, *, adapter: str | None = None,
        alpha: float | None = None, top_k_count: int | None = None,
        inspect: Sequence[int] | None = None, dtype: str = "float32",
        progress=None, implementation: str | None = None, out=None,
        chat: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
        mesh=None) -> dict:
  """The `gemma4-jax perplexity` command: prints a report, returns it.

  Every argument, file and token id is checked before a model is loaded.

  Args:
    inspect: example indices for `top_k_count` (default: example 0); only
      with `top_k_count`.

  Returns:
    `{"base": Result, "adapted": Result or absent, "top_k": {...}}`.

  Raises:
    DatasetError: a bad dataset (a line, no scored tokens); ValueError: bad
      arguments, files, or token ids outside the model's vocabulary.
  """
  import sys  # pylint: disable=g-import-not-at-top
  out = out or sys.stdout
  tokenizer, examples, inspect, adapter = _preflight(
      checkpoint, data, adapter=adapter, alpha=alpha,
      top_k_count=top_k_count, inspect=inspect, dtype=dtype, chat=chat,
      batch_size=batch_size)
  models = [("base", lambda: contextlib.nullcontext(checkpoint))]
  if adapter is not None:
    models.append(("adapted", lambda: merged_checkpoint(checkpoint, adapter,
                                                        alpha=alpha)))
  report = {"top_k": {}}
  for name, directory in models:
    with directory() as model_dir:
      model = load_model(model_dir, dtype=dtype, mesh=mesh)
      report[name] = perplexity(model, examples, progress=progress,
                                implementation=implementation,
                                description=name, batch_size=batch_size,
                                mesh=mesh)
      if top_k_count is not None:
        for index in inspect:
          report["top_k"][(name, index)] = top_k(model, examples[index],
                                                 top_k_count)
  _print_report(report, [name for name, _ in models], examples, tokenizer,
                out)
  return report


def _preflight(checkpoint, data, *, adapter, alpha, top_k_count, inspect,
               dtype, chat, batch_size):
  """`run`'s checks, cheapest first, all before a model is loaded: flags,
  files, the dataset, token ids against the vocabulary, the adapter.

  Returns:
    `(tokenizer, examples, inspect, adapter)`: the adapter loaded (an
    `export.adapter.Adapter`, checked against the base), or None.
  """
  from gemma4_jax import validation  # pylint: disable=g-import-not-at-top
  from gemma4_jax.export import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax.export import base as base_lib  # pylint: disable=g-import-not-at-top
  inspect = _check_flags(adapter=adapter, alpha=alpha,
                         top_k_count=top_k_count, inspect=inspect,
                         dtype=dtype, batch_size=batch_size)
  validation.check_input_dir("checkpoint", checkpoint)
  if adapter is not None:
    validation.check_input_dir("--adapter", adapter)
  records = read_dataset(data)
  if not records:
    raise DatasetError(f"{data}: no examples")
  text = read_text_config(checkpoint)
  tokenizer = load_tokenizer(checkpoint)
  examples = tokenize(records, tokenizer, chat=chat)
  if not any(example.scored.any() for example in examples):
    raise DatasetError(
        f"{data}: no scored tokens (a 'text' line scores every token after "
        f"the first, a 'prompt'/'completion' line its completion tokens); "
        f"the mean NLL of nothing is undefined")
  vocab = text["vocab_size"]
  _check_token_ids(examples, vocab, checkpoint)
  if top_k_count is not None:
    _check_inspected(examples, inspect, top_k_count, vocab)
  if adapter is not None:
    loaded = adapter_lib.load_adapter(adapter, alpha=alpha)
    base_lib.place_deltas(base_lib.open_base(checkpoint), loaded.deltas,
                          untie=False)
    adapter = loaded
  return tokenizer, examples, inspect, adapter


def _check_flags(*, adapter, alpha, top_k_count, inspect, dtype,
                 batch_size) -> tuple[int, ...]:
  """The checks that need no file; returns the examples to inspect."""
  from gemma4_jax import validation  # pylint: disable=g-import-not-at-top
  from gemma4_jax.export import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  # Flags that would be ignored are refused: a report that silently left
  # out what was asked for reads like an answer.
  if top_k_count is None and inspect is not None:
    raise ValueError("--inspect only selects examples for --top-k; pass "
                     "--top-k K too")
  if adapter is None and alpha is not None:
    raise ValueError("--alpha is the alpha of --adapter; pass --adapter too")
  if top_k_count is not None:
    validation.check_int("--top-k", top_k_count, minimum=1)
  inspect = (0,) if inspect is None else tuple(inspect)
  for index in inspect:
    validation.check_int("--inspect", index)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype: expected float32 or bfloat16, got {dtype!r}")
  validation.check_int("--batch-size", batch_size, minimum=1)
  adapter_lib.check_rank_alpha(None, alpha)
  return inspect


def _check_token_ids(examples: Sequence[Example], vocab: int,
                     checkpoint) -> None:
  for index, example in enumerate(examples):
    if len(example.tokens) and int(example.tokens.max()) >= vocab:
      # Out-of-vocabulary ids would read no row of the LM head and score
      # a perfect 0 NLL.
      raise ValueError(
          f"checkpoint: {os.path.join(checkpoint, TOKENIZER_FILE)} gives "
          f"token id {int(example.tokens.max())} (example {index}) but the "
          f"model's vocab_size is {vocab} (ids 0..{vocab - 1}); the "
          f"tokenizer does not belong to this checkpoint")


def _check_inspected(examples: Sequence[Example], inspect, top_k_count: int,
                     vocab: int) -> None:
  """`--top-k` against the vocabulary, `--inspect` against the examples."""
  if top_k_count > vocab:
    raise ValueError(f"--top-k: {top_k_count} is more than the vocabulary "
                     f"({vocab} tokens)")
  bad = [i for i in inspect if not 0 <= i < len(examples)]
  if bad:
    raise ValueError(f"--inspect: examples {bad} out of range [0, "
                     f"{len(examples)})")
  short = [i for i in inspect if len(examples[i].tokens) < 2]
  if short:
    raise ValueError(f"--inspect: example(s) {short} have fewer than 2 "
                     f"tokens: nothing is predicted in them")


def _print_report(report, names, examples, tokenizer, out):
  base = report["base"]
  print(f"{base.num_examples} examples, {base.num_tokens} scored tokens; "
        "NLL under softmax(c * tanh(logits / c)), c = the checkpoint's "
        "final_logit_softcapping: the distribution Gemma 4 samples from",
        file=out)
  print(f"{'model':<8} {'mean NLL':>10} {'perplexity':>12}", file=out)
  for name in names:
    result = report[name]
    print(f"{name:<8} {result.mean_nll:>10.4f} {result.perplexity:>12.4f}",
          file=out)
  for (name, index), top in report["top_k"].items():
    tokens = examples[index].tokens
    print(f"\nexample {index}, {name}: top-{top.ids.shape[1]} next tokens",
          file=out)
    for t in range(len(tokens) - 1):
      nxt = tokenizer.id_to_token(int(tokens[t + 1]))
      candidates = "  ".join(
          f"{tokenizer.id_to_token(int(i))!s}:{p:.4f}"
          for i, p in zip(top.ids[t], top.probs[t]))
      print(f"  {t:>4} {tokenizer.id_to_token(int(tokens[t]))!s:>12} -> "
            f"{nxt!s:<12} p={top.target_probs[t]:.4f} | {candidates}",
            file=out)
