"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained with HF ``tokenizers``.

Both satisfy the :class:`Tokenizer` protocol, round-trip any Unicode string
exactly (``decode(encode(s)) == s``) and add no special tokens when encoding;
the token files add ``bos_id``/``eos_id`` around each document themselves.

A tokenizer lives in a run directory as one file, ``tokenizer.json``: the HF
serialisation for BPE, or ``{"type": "byte", ...}`` for bytes.
:func:`load_tokenizer` reads either.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Protocol, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_mp.config import DataConfig
from llm_mp.data.files import DataError, write_atomic

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")  # BPE ids 0, 1, 2 in this order
BYTE_ALPHABET = 256


class Tokenizer(Protocol):
  """What the data pipeline, trainer and sampler need from a tokenizer."""

  vocab_size: int  # ids are in [0, vocab_size), specials included
  pad_id: int
  bos_id: int  # starts every document in the token files
  eos_id: int  # ends every document in the token files

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """``[encode(t) for t in texts]``, possibly in parallel."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``; special ids are dropped, invalid UTF-8 becomes U+FFFD."""

  def to_json(self) -> str:
    """The serialised tokenizer; also its identity in token-file cache keys."""

  def save(self, directory: str) -> str:
    """Writes ``directory/tokenizer.json`` atomically and returns its path."""


def _save_json(directory: str, text: str) -> str:
  path = os.path.join(directory, TOKENIZER_FILE)
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))
  return path


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then ``pad_id=256``, ``bos_id=257``, ``eos_id=258``.

  ``vocab_size`` is 259, ``ModelConfig``'s default. Nothing is trained.
  """

  vocab_size = BYTE_ALPHABET + 3
  pad_id = BYTE_ALPHABET
  bos_id = BYTE_ALPHABET + 1
  eos_id = BYTE_ALPHABET + 2

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    # Sampled ids need not form valid UTF-8; encoded text always does.
    return bytes(int(i) for i in ids if 0 <= i < BYTE_ALPHABET).decode("utf-8", errors="replace")

  def to_json(self) -> str:
    return json.dumps({"type": "byte", "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                       "bos_id": self.bos_id, "eos_id": self.eos_id})

  def save(self, directory: str) -> str:
    return _save_json(directory, self.to_json())


class BpeTokenizer:
  """Byte-level BPE (GPT-2 style) backed by an HF ``tokenizers.Tokenizer``.

  No normaliser (so non-NFC input survives), a ``ByteLevel`` pre-tokenizer
  without a prefix space and a ``ByteLevel`` decoder: encoding is lossless.
  Specials have ids 0 (pad), 1 (bos), 2 (eos); their literal strings in the
  text are encoded as ordinary text.
  """

  def __init__(self, hf: HFTokenizer):
    hf.encode_special_tokens = True  # not serialised by HF, so set on every load
    self.hf = hf
    self.vocab_size = hf.get_vocab_size()
    self.pad_id, self.bos_id, self.eos_id = (hf.token_to_id(t) for t in SPECIAL_TOKENS)
    if None in (self.pad_id, self.bos_id, self.eos_id):
      raise DataError(f"BPE tokenizer lacks the special tokens {list(SPECIAL_TOKENS)}")

  @classmethod
  def train(cls, docs: Sequence[str], vocab_size: int) -> BpeTokenizer:
    """Trains on ``docs``; the vocabulary has at most ``vocab_size`` entries.

    Fewer appear only when the corpus runs out of pairs to merge. Raises
    DataError if ``vocab_size`` cannot hold the 256 byte symbols and 3 specials.
    """
    floor = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < floor:
      raise DataError(f"data.bpe_vocab_size={vocab_size} must be >= {floor} "
                      "(256 byte symbols + 3 specials)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty())
    hf.train_from_iterator(docs, trainer, length=len(docs))
    return cls(hf)

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def to_json(self) -> str:
    return self.hf.to_str()

  def save(self, directory: str) -> str:
    return _save_json(directory, self.to_json())


def build_tokenizer(cfg: DataConfig, docs: Sequence[str]) -> Tokenizer:
  """The tokenizer ``cfg.tokenizer`` names; BPE is trained on ``docs`` to ``cfg.bpe_vocab_size``."""
  if cfg.tokenizer == "byte":
    return ByteTokenizer()
  return BpeTokenizer.train(docs, cfg.bpe_vocab_size)


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads ``directory/tokenizer.json`` written by ``save``.

  Raises:
    DataError: the file is missing or is not a tokenizer.
  """
  path = os.path.join(directory, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise DataError(f"tokenizer file not found: {path}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    if json.loads(text).get("type") == "byte":
      return ByteTokenizer()
    hf = HFTokenizer.from_str(text)
  except Exception as e:  # JSON errors, or HF's plain Exception for a bad tokenizer
    raise DataError(f"{path}: not a tokenizer ({type(e).__name__}: {e})") from None
  return BpeTokenizer(hf)
