"""Text generation with a Tunix Gemma 4: jitted, batched, on CPU and TPU.

One jitted program per batch shape: a prefill of the left-padded prompts
that fills Tunix's KV cache (the sliding-window ring buffer on local layers,
the shared caches of KV-sharing layers), then a `lax.while_loop` of decode
steps, each one token against the cache through the model's own decode path
(`ops.attention` when `gemma4_jax.patches` are applied). It stops when every
row has produced a stop token (`<turn|>`, EOS) or `max_new_tokens`.

Sampling is from the model's own output, `softmax(c * tanh(logits / c) / T)`
(Tunix's Gemma 4 applies the final softcap `c`): greedy at temperature 0,
else with optional top-k and top-p (nucleus) filtering. Each prompt draws
from its own key, `fold_in(fold_in(key(seed), prompt index), step)`, so its
completion does not depend on which prompts share its batch.

Under a mesh with Tunix's `('fsdp', 'tp')` axes, rows are split over
`fsdp` (the batch is padded to a multiple of it) and the weights keep the
shardings they were loaded with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import numpy as np

# Prompts are left-padded to a power of two (at least this), so that few
# prompt lengths are compiled.
MIN_PROMPT_LENGTH = 16
DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. Frozen and hashable: it is static under
  jit.

  temperature: 0 is greedy (argmax); otherwise the logits are divided by it.
  top_k: keep only the k most likely tokens (None: all).
  top_p: keep the smallest set of most likely tokens whose probability
    reaches top_p (None: all).
  """
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k: expected >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
    if self.temperature == 0 and (self.top_k is not None or
                                  self.top_p is not None):
      raise ValueError("top_k/top_p: greedy decoding (temperature 0) would "
                       "ignore them; set a temperature > 0 to sample")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Completion:
  """The generated tokens of one prompt, without the stop token.

  stopped: True when a stop token ended it, False when max_new_tokens did.
  """
  tokens: np.ndarray
  stopped: bool


def sample_next(logits, key, config: SamplingConfig):
  """One token from `logits [V]` (float32) with `key`; see SamplingConfig."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if config.greedy:
    return jnp.argmax(logits).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / config.temperature
  if config.top_k is None and config.top_p is None:
    return jax.random.categorical(key, logits).astype(jnp.int32)
  k = logits.shape[-1] if config.top_k is None else min(config.top_k,
                                                        logits.shape[-1])
  values, ids = jax.lax.top_k(logits, k)  # most likely first
  if config.top_p is not None:
    probs = jax.nn.softmax(values)
    # Drop a token when the ones before it already exceed top_p (Tunix's
    # rule): the most likely token always stays.
    values = jnp.where(jnp.cumsum(probs) - probs > config.top_p, -jnp.inf,
                       values)
  return ids[jax.random.categorical(key, values)].astype(jnp.int32)


def _prompt_length(length: int) -> int:
  return max(MIN_PROMPT_LENGTH, 1 << max(0, length - 1).bit_length())


def _generate_fn(graphdef, *, max_new_tokens: int, cache_size: int,
                 sampling: SamplingConfig, stop_ids: tuple[int, ...],
                 pad_id: int):
  """The jitted prefill + decode loop for one batch shape."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def generate(state, cache, tokens, prompt_mask, row_keys):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    # Keys live on the cache's timeline: slots [0, prompt_len) hold the
    # left-padded prompt, slot prompt_len + s the s-th generated token.
    slots = jnp.arange(cache_size)
    prompt_keys = jnp.pad(prompt_mask, ((0, 0), (0, cache_size - prompt_len)))
    prefill_mask = prompt_keys[:, None, :] & (
        slots[None, None, :] <= jnp.arange(prompt_len)[None, :, None])
    logits, cache = model(tokens, positions=positions, cache=cache,
                          attention_mask=prefill_mask,
                          decode_only_last_token=True)
    num_prompt_tokens = jnp.sum(prompt_mask, axis=-1)
    stops = jnp.asarray(stop_ids, jnp.int32)
    sample = jax.vmap(lambda row, key: sample_next(row, key, sampling))

    def cond(carry):
      step, _, _, _, done, _ = carry
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      step, logits, cache, out, done, lengths = carry
      keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
      token = jnp.where(done, pad_id, sample(logits, keys))
      out = out.at[:, step].set(token)
      stopped = ~done & jnp.isin(token, stops)
      done = done | stopped
      lengths = jnp.where(done, lengths, step + 1)
      visible = prompt_keys | ((slots >= prompt_len) &
                               (slots <= prompt_len + step))[None]
      logits, cache = model(token[:, None],
                            positions=(num_prompt_tokens + step)[:, None],
                            cache=cache, attention_mask=visible[:, None, :])
      return step + 1, logits[:, -1], cache, out, done, lengths

    carry = (jnp.int32(0), logits[:, -1], cache,
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
    _, _, _, out, done, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths, done

  return jax.jit(generate)


def generate(model, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, stop_ids: Sequence[int] = (),
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             pad_id: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
             mesh=None, progress=None) -> list[Completion]:
  """Completions of `prompts` (token ids, e.g. from `chat.encode_prompt`).

  Args:
    model: a Tunix Gemma 4 (with or without qwix LoRA). It runs as it is:
      patched when `gemma4_jax.patches` are applied at this call.
    prompts: one list of token ids per prompt, in any order of lengths.
    max_new_tokens: at most this many tokens per prompt.
    stop_ids: a completion ends at the first of these (not included).
    sampling: greedy by default.
    seed: for sampling; prompt i draws from `fold_in(key(seed), i)`.
    pad_id: the padding token (left padding never reaches the model: it is
      masked; the id only fills the output after a stop).
    batch_size: prompts per jitted call (rounded up to a multiple of the
      mesh's `fsdp` size).
    mesh: a `('fsdp', 'tp')` mesh to run on, or None.
    progress: show a tqdm bar over batches (None: only on a terminal).

  Returns:
    One `Completion` per prompt, in the order of `prompts`.

  Raises:
    ValueError: an empty prompt, max_new_tokens < 1, batch_size < 1.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  prompts = _checked_prompts(prompts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
  batch_size = _rows_per_batch(batch_size, len(prompts), mesh)
  graphdef, state = nnx.split(model)
  base_key = jax.random.key(seed)
  # One program per prompt length (`_prompt_length` rounds to few).
  compiled = functools.cache(lambda prompt_len: _generate_fn(
      graphdef, max_new_tokens=max_new_tokens,
      cache_size=prompt_len + max_new_tokens, sampling=sampling,
      stop_ids=tuple(int(s) for s in stop_ids), pad_id=pad_id))
  results: list[Completion | None] = [None] * len(prompts)
  scope = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  bar = tqdm.tqdm(_length_sorted_batches(prompts, batch_size),
                  desc="generate", unit="batch",
                  disable=(not progress) if progress is not None else None)
  with scope:
    for rows in bar:
      # The last batch is filled with copies of its first prompt, so every
      # batch has one shape; their outputs are dropped.
      padded_rows = rows + [rows[0]] * (batch_size - len(rows))
      out, lengths, done = _run_batch(
          compiled, model, state, prompts, padded_rows, pad_id=pad_id,
          base_key=base_key, max_new_tokens=max_new_tokens, mesh=mesh)
      for r, i in enumerate(rows):
        results[i] = Completion(out[r, :lengths[r]].copy(), bool(done[r]))
  return results


def _checked_prompts(prompts, *, max_new_tokens: int,
                     batch_size: int) -> list[np.ndarray]:
  """`generate`'s argument checks; the prompts as int32 arrays."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
  if batch_size < 1:
    raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  empty = [i for i, p in enumerate(prompts) if p.size == 0]
  if empty:
    raise ValueError(f"prompts: {empty} are empty (at least one token, "
                     "e.g. <bos>)")
  return prompts


def _rows_per_batch(batch_size: int, num_prompts: int, mesh) -> int:
  """Rows of every jitted call: without a mesh no more than there are
  prompts; with one, a multiple of its `fsdp` size."""
  if mesh is None:
    return min(batch_size, num_prompts)
  from gemma4_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  fsdp = mesh.shape.get(mesh_lib.FSDP, 1)
  return -(-batch_size // fsdp) * fsdp


def _length_sorted_batches(prompts, batch_size: int) -> list[list[int]]:
  """Prompt indices in batches of `batch_size`, shortest prompts first.

  Similar lengths share a batch (less padding); the per-prompt keys keep
  each completion independent of its batch.
  """
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _left_padded(prompts, rows, pad_id: int):
  """`(tokens, mask)` `[len(rows), prompt_len]`: the prompts `rows`
  left-padded to one power-of-two length."""
  prompt_len = _prompt_length(max(len(prompts[i]) for i in rows))
  tokens = np.full((len(rows), prompt_len), pad_id, np.int32)
  mask = np.zeros((len(rows), prompt_len), bool)
  for r, i in enumerate(rows):
    tokens[r, prompt_len - len(prompts[i]):] = prompts[i]
    mask[r, prompt_len - len(prompts[i]):] = True
  return tokens, mask


def _run_batch(compiled, model, state, prompts, rows, *, pad_id: int,
               base_key, max_new_tokens: int, mesh):
  """One jitted prefill + decode of the prompts `rows`, left-padded;
  `(out, lengths, done)` on the host. `compiled(prompt_len)` is the jitted
  program; row r draws from `fold_in(base_key, rows[r])`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  tokens, mask = _left_padded(prompts, rows, pad_id)
  prompt_len = tokens.shape[1]
  row_keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
      jnp.asarray(rows, jnp.uint32))
  data = (jnp.asarray(tokens), jnp.asarray(mask), row_keys)
  if mesh is not None:
    from gemma4_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    rows_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh_lib.FSDP))
    data = tuple(jax.device_put(x, rows_sharding) for x in data)
  cache = model.init_cache(len(rows), prompt_len + max_new_tokens,
                           model.config.dtype)
  return jax.device_get(compiled(prompt_len)(state, cache, *data))


def read_prompts(path: str | os.PathLike) -> list[dict]:
  """JSONL records with a `prompt` (or `text`) string; a `completion`
  string, when present, is kept as the reference answer.

  Raises:
    ValueError: naming the file and line of the first bad record.
  """
  from gemma4_jax import perplexity  # pylint: disable=g-import-not-at-top
  records = []
  for where, record in perplexity.jsonl_objects(path, error=ValueError,
                                                missing=FileNotFoundError):
    prompt = record.get("prompt", record.get("text"))
    if not isinstance(prompt, str):
      raise ValueError(f"{where}: expected a 'prompt' (or 'text') string, "
                       f"got fields {sorted(record)}")
    reference = record.get("completion")
    if reference is not None and not isinstance(reference, str):
      raise ValueError(f"{where}: field 'completion' must be a string, got "
                       f"{type(reference).__name__}")
    records.append({"prompt": prompt, "completion": reference})
  return records


def run(checkpoint: str, *, prompts: Sequence[str] = (),
        data: str | None = None, adapter: str | None = None,
        alpha: float | None = None, chat: bool = False,
        max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
        dtype: str = "float32", as_json: bool = False, mesh=None,
        progress=None, out=None) -> list[dict]:
  """The `gemma4-jax generate` command: prints completions, returns them.

  Returns:
    One dict per prompt: prompt, completion (text), tokens, stopped, and
    the reference completion when the JSONL had one.
  """
  from gemma4_jax import chat as chat_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax import perplexity  # pylint: disable=g-import-not-at-top
  out = out or sys.stdout
  records = [{"prompt": p, "completion": None} for p in prompts]
  if data is not None:
    records += read_prompts(data)
  if not records:
    raise ValueError("no prompts: give --prompt or --data")
  tokenizer, ids, adapter = _preflight(checkpoint, records, adapter=adapter,
                                       alpha=alpha, chat=chat,
                                       top_k=sampling.top_k)
  stop_ids = chat_lib.stop_token_ids(tokenizer, checkpoint)
  directory = (perplexity.merged_checkpoint(checkpoint, adapter, alpha=alpha)
               if adapter is not None else _nullcontext(checkpoint))
  with directory as model_dir:
    model = perplexity.load_model(model_dir, dtype=dtype, mesh=mesh)
    completions = generate(model, ids, max_new_tokens=max_new_tokens,
                           stop_ids=stop_ids, sampling=sampling, seed=seed,
                           pad_id=chat_lib.pad_id(tokenizer),
                           batch_size=batch_size, mesh=mesh,
                           progress=progress)
  results = []
  for record, completion in zip(records, completions):
    result = {"prompt": record["prompt"],
              "completion": tokenizer.decode(completion.tokens.tolist()),
              "tokens": completion.tokens.tolist(),
              "stopped": completion.stopped}
    if record["completion"] is not None:
      result["reference"] = record["completion"]
    results.append(result)
    if as_json:
      print(json.dumps(result), file=out)
    else:
      end = "stop token" if completion.stopped else "max_new_tokens"
      print(f"### prompt: {record['prompt']}", file=out)
      print(f"--- completion ({len(completion.tokens)} tokens, ended by "
            f"{end}):\n{result['completion']}", file=out)
      if "reference" in result:
        print(f"--- reference:\n{result['reference']}", file=out)
      print(file=out)
  return results


def register(commands) -> None:
  """Adds `gemma4-jax generate` to the CLI's subcommands."""
  generate = commands.add_parser(
      "generate", help="generate text from a Hugging Face Gemma 4 checkpoint",
      description="Completions of prompts by a Hugging Face Gemma 4 "
      "checkpoint (loaded with Tunix), optionally with a LoRA adapter merged "
      "on the host as `merge` does. Jitted: the left-padded prompts of a "
      "batch fill Tunix's KV cache, then one token per step until <turn|>, "
      "EOS or --max-new-tokens. Greedy unless --temperature > 0. Runs on "
      "CPU and TPU; with several devices, on an ('fsdp', 'tp') mesh.")
  from gemma4_jax import cli  # pylint: disable=g-import-not-at-top
  cli.add_checkpoint_args(generate, adapter_help=(
      "LoRA adapter (Tunix checkpoint or PEFT directory), merged into the "
      "base first"))
  generate.add_argument("--prompt", action="append", default=[],
                        metavar="TEXT", help="a prompt (repeatable)")
  generate.add_argument("--data", help="JSONL of {\"prompt\": ...} lines (a "
                        "\"completion\" field is printed as the reference)")
  generate.add_argument("--chat", action="store_true",
                        help="wrap each prompt in Gemma 4's turn format: "
                        "<bos><|turn>user\\n...<turn|>\\n<|turn>model\\n")
  generate.add_argument("--max-new-tokens", type=int, default=64,
                        help="at most this many tokens per prompt (default "
                        "64)")
  generate.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy; > 0 samples from "
                        "softmax(softcapped logits / temperature)")
  generate.add_argument("--top-k", type=int,
                        help="sample among the K most likely tokens")
  generate.add_argument("--top-p", type=float,
                        help="sample among the most likely tokens up to "
                        "probability P")
  generate.add_argument("--seed", type=int, default=0,
                        help="sampling seed (default 0)")
  generate.add_argument("--batch-size", type=int, default=8,
                        help="prompts per batch (default 8)")
  generate.add_argument("--dtype", choices=["float32", "bfloat16"],
                        default="float32",
                        help="parameter and compute dtype (default float32)")
  generate.add_argument("--json", action="store_true",
                        help="one JSON object per prompt")
  generate.set_defaults(func=_run_command)


# jax.random.key keeps 32 bits of its seed (without x64): larger or negative
# seeds would silently repeat the streams of others.
SEED_LIMIT = 2**32


def check_flags(*, max_new_tokens, temperature, top_k, top_p, seed,
                batch_size, adapter, alpha) -> None:
  """The checks of `generate`'s flags that need no file, each naming its
  flag (`SamplingConfig` and `generate` check the same for Python callers,
  by argument name).

  Raises:
    ValueError / TypeError: naming the flag, expected and actual value.
  """
  from gemma4_jax import validation  # pylint: disable=g-import-not-at-top
  from gemma4_jax.export import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  validation.check_int("--max-new-tokens", max_new_tokens, minimum=1)
  validation.check_int("--batch-size", batch_size, minimum=1)
  validation.check_int("--seed", seed, minimum=0)
  if seed >= SEED_LIMIT:
    raise ValueError(f"--seed must be < 2**32 (JAX's PRNG keeps 32 bits: "
                     f"{seed} would repeat seed {seed % SEED_LIMIT}), got "
                     f"{seed}")
  validation.check_number("--temperature", temperature,
                          what="0 for greedy, > 0 to sample")
  if temperature < 0:
    raise ValueError(f"--temperature must be >= 0 (0 for greedy), got "
                     f"{temperature}")
  validation.check_int("--top-k", top_k, minimum=1, allow_none=True)
  validation.check_number("--top-p", top_p, allow_none=True,
                          what="in (0, 1]")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
  # Flags that would be ignored are refused, as in `perplexity`.
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ValueError("--top-k/--top-p: greedy decoding (--temperature 0) "
                     "would ignore them; pass --temperature > 0 to sample")
  if adapter is None and alpha is not None:
    raise ValueError("--alpha is the alpha of --adapter; pass --adapter too")
  adapter_lib.check_rank_alpha(None, alpha)


def _preflight(checkpoint, records, *, adapter, alpha, chat, top_k):
  """`run`'s checks of the files, before any model is loaded: the
  checkpoint's config and tokenizer, every prompt's token ids against the
  vocabulary, the adapter against the base.

  Returns:
    `(tokenizer, ids, adapter)`: the adapter loaded (an
    `export.adapter.Adapter`, checked against the base), or None.
  """
  from gemma4_jax import chat as chat_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax import perplexity  # pylint: disable=g-import-not-at-top
  from gemma4_jax import validation  # pylint: disable=g-import-not-at-top
  from gemma4_jax.export import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax.export import base as base_lib  # pylint: disable=g-import-not-at-top
  validation.check_input_dir("checkpoint", checkpoint)
  if adapter is not None and not isinstance(adapter, adapter_lib.Adapter):
    validation.check_input_dir("--adapter", adapter)
  vocab = perplexity.read_text_config(checkpoint)["vocab_size"]
  tokenizer = perplexity.load_tokenizer(checkpoint)
  ids = [chat_lib.encode_prompt(tokenizer, r["prompt"], chat=chat)
         for r in records]
  empty = [i for i, p in enumerate(ids) if not p]
  if empty:
    raise ValueError(f"prompts {empty} have no tokens (the tokenizer adds "
                     "no <bos>): pass --chat or a non-empty prompt")
  for index, prompt in enumerate(ids):
    if max(prompt) >= vocab:
      # An id past the vocabulary reads no embedding row: garbage output.
      raise ValueError(
          f"checkpoint: {os.path.join(checkpoint, perplexity.TOKENIZER_FILE)}"
          f" gives token id {max(prompt)} (prompt {index}) but the model's "
          f"vocab_size is {vocab}; the tokenizer does not belong to this "
          "checkpoint")
  if top_k is not None and top_k > vocab:
    raise ValueError(f"--top-k: {top_k} is more than the vocabulary ({vocab} "
                     "tokens)")
  if adapter is not None and not isinstance(adapter, adapter_lib.Adapter):
    loaded = adapter_lib.load_adapter(adapter, alpha=alpha)
    base_lib.place_deltas(base_lib.open_base(checkpoint), loaded.deltas,
                          untie=False)
    adapter = loaded
  return tokenizer, ids, adapter


def _run_command(args) -> int:
  from gemma4_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  check_flags(max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
              adapter=args.adapter, alpha=args.alpha)
  try:
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    run(args.checkpoint, prompts=args.prompt, data=args.data,
        adapter=args.adapter, alpha=args.alpha, chat=args.chat,
        max_new_tokens=args.max_new_tokens, sampling=sampling,
        seed=args.seed, batch_size=args.batch_size, dtype=args.dtype,
        as_json=args.json, mesh=mesh_lib.default_mesh())
  except (ValueError, FileNotFoundError) as e:
    print(f"gemma4-jax generate: error: {e}", file=sys.stderr)
    return 2
  return 0


def _nullcontext(value):
  import contextlib  # pylint: disable=g-import-not-at-top
  return contextlib.nullcontext(value)
