"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained with HF ``tokenizers``.

Both satisfy the :class:`Tokenizer` protocol, round-trip any Unicode string
exactly (``decode(encode(s)) == s``) and add no special tokens when encoding;
the token files add ``bos_id``/``eos_id`` around each document themselves, and
a generation prompt starts with ``bos_id`` when ``add_bos`` says so.

A tokenizer lives in a run directory as one file, ``tokenizer.json``: the HF
serialisation for BPE, or ``{"type": "byte", ...}`` for bytes.
:func:`load_tokenizer` reads either. A tokenizer imported from Hugging Face
(GPT-2's, a LLaMA-family one) keeps its own special tokens: they are named,
as in an HF checkpoint, by ``tokenizer_config.json`` (``bos_token``,
``eos_token``, ``pad_token``) beside ``tokenizer.json``; without that file the
specials are llm_mp's own ``<|pad|>``, ``<|bos|>``, ``<|eos|>``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Protocol, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llm_mp.config import DataConfig
from llm_mp.data.files import DataError, write_atomic

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # HF's: names the bos/eos/pad tokens
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")  # BPE ids 0, 1, 2 in this order
BYTE_ALPHABET = 256


class Tokenizer(Protocol):
  """What the data pipeline, trainer and sampler need from a tokenizer."""

  vocab_size: int  # ids are in [0, vocab_size), specials included
  pad_id: int
  bos_id: int  # starts every document in the token files
  eos_id: int  # ends every document in the token files
  add_bos: bool  # a prompt starts with bos_id, as this tokenizer's own encoding of text does

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """``[encode(t) for t in texts]``, possibly in parallel."""

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``encode(text)`` and, per token, the ``(start, end)`` character span of
    ``text`` it came from (a token holding part of a character's bytes spans
    that whole character)."""

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
  add_bos = True

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    # Every byte of character i spans (i, i + 1).
    offsets = [(i, i + 1) for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
    return self.encode(text), offsets

  def decode(self, ids: Sequence[int]) -> str:
    # Sampled ids need not form valid UTF-8; encoded text always does.
    return bytes(int(i) for i in ids if 0 <= i < BYTE_ALPHABET).decode("utf-8", errors="replace")

  def to_json(self) -> str:
    return json.dumps(
      {
        "type": "byte",
        "vocab_size": self.vocab_size,
        "pad_id": self.pad_id,
        "bos_id": self.bos_id,
        "eos_id": self.eos_id,
      }
    )

  def save(self, directory: str) -> str:
    return _save_json(directory, self.to_json())

  def as_bpe(self) -> BpeTokenizer:
    """The same ids as an HF byte-level BPE with no merges, for ``transformers``.

    Byte ``b`` is the vocabulary entry of its GPT-2 byte-level symbol with id ``b``;
    the specials keep ids 256-258 under :data:`SPECIAL_TOKENS`, and a template
    puts BOS first when HF encodes with special tokens, as prompts start here.
    """
    vocab = {symbol: b for b, symbol in _byte_symbols().items()}
    vocab.update({name: BYTE_ALPHABET + i for i, name in enumerate(SPECIAL_TOKENS)})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS[1]
    hf.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, self.bos_id)]
    )
    return BpeTokenizer(hf, SPECIAL_TOKENS)


def _byte_symbols() -> dict[int, str]:
  """GPT-2's byte-level alphabet: the printable symbol that stands for each byte
  (printable Latin-1 bytes stand for themselves, the others for U+0100 onwards)."""
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  kept += range(ord("®"), ord("ÿ") + 1)
  moved = [b for b in range(BYTE_ALPHABET) if b not in kept]
  return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


class BpeTokenizer:
  """Byte-level BPE (GPT-2 style) backed by an HF ``tokenizers.Tokenizer``.

  No normaliser (so non-NFC input survives), a ``ByteLevel`` pre-tokenizer
  without a prefix space and a ``ByteLevel`` decoder: encoding is lossless.
  Specials have ids 0 (pad), 1 (bos), 2 (eos); their literal strings in the
  text are encoded as ordinary text.

  ``specials`` (pad, bos, eos token strings) wraps any HF tokenizer with its
  own special tokens instead (an imported one: GPT-2's ``<|endoftext|>`` is
  bos, eos and pad at once); it is then saved as ``tokenizer_config.json``.

  ``add_bos``: whether a prompt starts with ``bos_id``. An imported tokenizer
  follows its ``tokenizer.json`` post-processor, as HF encodes with special
  tokens on (a LLaMA template adds BOS, GPT-2's and Qwen2's add none); our own
  BPE has no post-processor and starts prompts with BOS, as documents start in
  the token files.
  """

  def __init__(self, hf: HFTokenizer, specials: Sequence[str] | None = None):
    hf.encode_special_tokens = True  # not serialised by HF, so set on every load
    self.hf = hf
    self.vocab_size = hf.get_vocab_size()
    self.specials = tuple(specials) if specials is not None else None
    names = self.specials or SPECIAL_TOKENS
    self.pad_id, self.bos_id, self.eos_id = (hf.token_to_id(t) for t in names)
    if None in (self.pad_id, self.bos_id, self.eos_id):
      raise DataError(f"BPE tokenizer lacks the special tokens {list(names)}")
    self.add_bos = self.specials is None or hf.encode("", add_special_tokens=True).ids[:1] == [
      self.bos_id
    ]

  @classmethod
  def train(cls, docs: Sequence[str], vocab_size: int) -> BpeTokenizer:
    """Trains on ``docs``; the vocabulary has at most ``vocab_size`` entries.

    Fewer appear only when the corpus runs out of pairs to merge. Raises
    DataError if ``vocab_size`` cannot hold the 256 byte symbols and 3 specials.
    """
    floor = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < floor:
      raise DataError(
        f"data.bpe_vocab_size={vocab_size} must be >= {floor} (256 byte symbols + 3 specials)"
      )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=sys.stderr.isatty(),
    )
    hf.train_from_iterator(docs, trainer, length=len(docs))
    return cls(hf)

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    # HF tracks each token's characters through the byte-level pre-tokenizer.
    encoding = self.hf.encode(text, add_special_tokens=False)
    return encoding.ids, [tuple(o) for o in encoding.offsets]

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def to_json(self) -> str:
    if self.specials is None:
      return self.hf.to_str()
    # The specials decide the bos/eos framing of the token files: part of the identity.
    return self.hf.to_str() + "\n" + json.dumps(self.tokenizer_config())

  def tokenizer_config(self) -> dict[str, str]:
    """HF ``tokenizer_config.json`` fields naming the special tokens."""
    pad, bos, eos = self.specials or SPECIAL_TOKENS
    return {"bos_token": bos, "eos_token": eos, "pad_token": pad}

  def save(self, directory: str) -> str:
    if self.specials is not None:
      config = json.dumps(self.tokenizer_config(), indent=2)
      write_atomic(
        os.path.join(directory, TOKENIZER_CONFIG_FILE), lambda f: f.write(config.encode("utf-8"))
      )
    return _save_json(directory, self.hf.to_str())


def build_tokenizer(cfg: DataConfig, docs: Sequence[str]) -> Tokenizer:
  """The tokenizer ``cfg.tokenizer`` names; BPE is trained on ``docs`` to ``cfg.bpe_vocab_size``."""
  if cfg.tokenizer == "byte":
    return ByteTokenizer()
  return BpeTokenizer.train(docs, cfg.bpe_vocab_size)


def _token_name(value) -> str | None:
  """A tokenizer_config.json token entry: a string or ``{"content": ...}``."""
  return value.get("content") if isinstance(value, dict) else value


def read_specials(directory: str, hf: HFTokenizer) -> tuple[str, str, str] | None:
  """(pad, bos, eos) token strings named by ``directory/tokenizer_config.json``.

  None when the file is absent. A missing ``pad_token`` is the eos token (GPT-2
  has none; padded positions never reach the loss); a missing ``bos_token``
  is the eos token too (documents are then separated by eos alone).

  Raises:
    DataError: the file is unreadable, names no eos token, or names a token
      the vocabulary lacks.
  """
  path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not readable JSON ({e})") from None
  eos = _token_name(cfg.get("eos_token"))
  if not eos:
    raise DataError(f"{path}: field eos_token is missing")
  bos = _token_name(cfg.get("bos_token")) or eos
  pad = _token_name(cfg.get("pad_token")) or eos
  for field, token in (("pad_token", pad), ("bos_token", bos), ("eos_token", eos)):
    if hf.token_to_id(token) is None:
      raise DataError(f"{path}: field {field}={token!r} is not in the vocabulary")
  return pad, bos, eos


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads ``directory/tokenizer.json`` written by ``save`` (or an HF checkpoint's,
  with the specials of its ``tokenizer_config.json``).

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
  return BpeTokenizer(hf, read_specials(directory, hf))
