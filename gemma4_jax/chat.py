"""Gemma 4's turn format, and prompt/completion examples tokenized in it.

A user turn and the start of the model's turn, as Gemma 4's chat template
writes them (and Tunix's `Gemma4ChatTemplateParser`):

    <bos><|turn>user\n{prompt}<turn|>\n<|turn>model\n

The model ends its turn with `<turn|>`, so a completion is trained (and
scored) as `{completion}<turn|>`: the model learns to stop, and `generate`
stops there. Fine-tuning, `perplexity --chat` and `generate --chat` all go
through `encode_prompt`/`encode_example`, so evaluation sees exactly the
tokens training saw.
"""

from __future__ import annotations

import json
import os

import numpy as np

BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
TURN_START = "<|turn>"
TURN_END = "<turn|>"
SPECIAL_TOKENS = (PAD, EOS, BOS, TURN_START, TURN_END)


def prompt_text(prompt: str) -> str:
  """`prompt` as a user turn followed by the opening of the model's turn."""
  return f"{BOS}{TURN_START}user\n{prompt}{TURN_END}\n{TURN_START}model\n"


def completion_text(completion: str) -> str:
  """The model's turn body as trained: the completion, then `<turn|>`."""
  return f"{completion}{TURN_END}"


def token_id(tokenizer, token: str) -> int:
  """The id of a special token; a ValueError naming it when it is absent."""
  index = tokenizer.token_to_id(token)
  if index is None:
    raise ValueError(f"tokenizer: no {token!r} token (not a Gemma 4 "
                     "tokenizer?)")
  return index


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
  """Token ids of a prompt: in the turn format with `chat`, else the text
  with the tokenizer's own special tokens (Gemma's adds `<bos>`)."""
  if chat:
    # The format writes <bos> itself: the tokenizer must not add another.
    return tokenizer.encode(prompt_text(prompt), add_special_tokens=False).ids
  return tokenizer.encode(prompt).ids


def encode_example(tokenizer, prompt: str, completion: str, *, chat: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
  """`(tokens [T] int32, completion_mask [T] bool)`: the prompt then the
  completion; the mask is True on the completion's tokens, the ones a
  fine-tune is trained on and perplexity scores."""
  prompt_ids = encode_prompt(tokenizer, prompt, chat=chat)
  body = completion_text(completion) if chat else completion
  completion_ids = tokenizer.encode(body, add_special_tokens=False).ids
  tokens = np.asarray(prompt_ids + completion_ids, np.int32)
  mask = np.zeros(len(tokens), bool)
  mask[len(prompt_ids):] = True
  return tokens, mask


def stop_token_ids(tokenizer, checkpoint_dir: str | os.PathLike | None = None
                   ) -> tuple[int, ...]:
  """Where generation ends: `<turn|>`, `<eos>` and the checkpoint's
  `eos_token_id`s (config.json, generation_config.json), those present."""
  ids = {tokenizer.token_to_id(t) for t in (TURN_END, EOS)}
  if checkpoint_dir is not None:
    for name in ("config.json", "generation_config.json"):
      path = os.path.join(checkpoint_dir, name)
      if not os.path.exists(path):
        continue
      with open(path) as f:
        config = json.load(f)
      for scope in (config, config.get("text_config") or {}):
        eos = scope.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
  return tuple(sorted(i for i in ids if i is not None))


def pad_id(tokenizer) -> int:
  """`<pad>`'s id (Gemma's is 0)."""
  index = tokenizer.token_to_id(PAD)
  return 0 if index is None else index
