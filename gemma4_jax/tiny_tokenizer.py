"""A word-level `tokenizer.json` with Gemma 4's special tokens.

Makes the tiny checkpoints of the demo, the fine-tuning script's CI run and
the tests complete Hugging Face checkpoints: `<pad>` 0, `<eos>` 1, `<bos>`
2 (added in front of plain text, as Gemma's tokenizer does), `<|turn>` and
`<turn|>` (the turn format of `gemma4_jax.chat`), then the given words, and
every other id `i` as the word `w{i}`. Words are split on whitespace, so
the turn format's newlines are not tokens here; everything else about the
format is.

Test support, not part of the public API: used by the tests and
`gemma4-jax demo`. Depends on `tokenizers` (imported when called).
"""

from __future__ import annotations

import os
from typing import Sequence

from gemma4_jax import chat

TOKENIZER_FILE = "tokenizer.json"
ROLE_WORDS = ("user", "model")


def word(index: int) -> str:
  """The word of id `index` when no named word took it."""
  return f"w{index}"


def build(vocab_size: int, words: Sequence[str] = ()):
  """A `tokenizers.Tokenizer` over `vocab_size` ids (see the module doc)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  named = list(chat.SPECIAL_TOKENS) + list(ROLE_WORDS) + list(words)
  if len(set(named)) != len(named):
    raise ValueError(f"words: duplicates in {list(words)}")
  if len(named) > vocab_size:
    raise ValueError(f"vocab_size: {vocab_size} is fewer than the "
                     f"{len(named)} named tokens")
  vocab = {token: i for i, token in enumerate(named)}
  vocab.update({word(i): i for i in range(len(named), vocab_size)})
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=chat.PAD))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # Special tokens are matched in the text before it is split into words.
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t in chat.SPECIAL_TOKENS])
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{chat.BOS} $A", special_tokens=[(chat.BOS,
                                                vocab[chat.BOS])])
  return tokenizer


def write(directory: str | os.PathLike, vocab_size: int,
          words: Sequence[str] = ()) -> str:
  """Saves `build(vocab_size, words)` as `directory/tokenizer.json`."""
  path = os.path.join(directory, TOKENIZER_FILE)
  build(vocab_size, words).save(path)
  return path
