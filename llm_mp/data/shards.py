"""Token files: a corpus tokenised once into memory-mapped arrays, cached by content.

Each split (train, validation) is one flat token stream in which every
document is ``[bos_id] + encode(text) + [eos_id]``, plus the start index of each
document in that stream. On disk, under ``cache_dir/<key>/``::

  train.tokens.npy  uint16[N] (uint32 when vocab_size > 65536)
  train.starts.npy  int64[D]  start of each document; starts[0] == 0
  val.tokens.npy, val.starts.npy
  meta.json         the key and counts; written last, so its presence marks a
                    complete cache entry

``key`` is a SHA-256 of the documents' text, the tokenizer's serialisation and
the format version, so any change to the corpus, cleaning or tokenizer gives a
new entry and unchanged inputs reuse the old one without tokenising. Every
file is written atomically; old entries are never deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
import tqdm

from llm_mp.data.files import write_atomic
from llm_mp.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_CHUNK_DOCS = 256  # documents per encode_batch call (one progress-bar step)


@dataclasses.dataclass(frozen=True)
class TokenSplit:
  """One split's token stream.

  Attributes:
    tokens: ``uint16[N]`` or ``uint32[N]``, usually a read-only ``np.memmap``;
      documents back to back, each wrapped in BOS ... EOS.
    starts: ``int64[D]``, index in ``tokens`` where each document's BOS is.
  """

  tokens: np.ndarray
  starts: np.ndarray

  @property
  def num_docs(self) -> int:
    return len(self.starts)

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class TokenShards:
  """Both splits, where they live, and whether they came from the cache."""

  train: TokenSplit
  val: TokenSplit
  directory: str
  reused: bool  # True when the files already existed and nothing was tokenised


def token_dtype(vocab_size: int) -> np.dtype:
  """``uint16`` when every id fits in 16 bits, else ``uint32``."""
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Splits documents into ``(train, val)`` holding out ``val_fraction`` of the text.

  Whole documents where there are enough of them: in order of their SHA-256
  (so the choice depends on the texts, not on their order), until they hold
  ``val_fraction`` of the characters, if that overshoots by at most half and
  leaves training text. Otherwise (a few large documents, e.g.
  tinyshakespeare's 3, where one would be 40% of the text; a single
  document) the validation split is the last ``val_fraction`` of the
  characters, cut out of the last document(s), as nanoGPT does.
  Deterministic; both lists keep the input order; ``val_fraction == 0``
  gives ``(docs, [])``.
  """
  n = len(docs)
  if val_fraction <= 0 or n == 0:
    return list(docs), []
  total = sum(map(len, docs))
  target = total * val_fraction
  digests = [hashlib.sha256(d.encode("utf-8")).digest() for d in docs]
  val_ids, held = set(), 0
  for i in sorted(range(n), key=lambda i: (digests[i], i)):
    if held >= target:
      break
    val_ids.add(i)
    held += len(docs[i])
  if held <= 1.5 * target and len(val_ids) < n:
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val
  want = min(max(round(target), 1), total - 1)  # characters to hold out
  train, val = list(docs), []
  while want > 0 and train:
    last = train.pop()
    if len(last) <= want and train:
      val.insert(0, last)
      want -= len(last)
    else:
      cut = max(len(last) - want, 1)
      train.append(last[:cut])
      val.insert(0, last[cut:])
      want = 0
  return train, val


def corpus_sha256(docs: Sequence[str]) -> str:
  """SHA-256 hex digest of documents (their texts and boundaries, in order)."""
  h = hashlib.sha256()
  for doc in docs:
    data = doc.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()


def cache_key(splits: dict[str, Sequence[str]], tokenizer: Tokenizer) -> str:
  """SHA-256 hex digest of the split documents, the tokenizer and the format."""
  h = hashlib.sha256(f"llm_mp.data.shards v{FORMAT_VERSION}\n".encode())
  h.update(tokenizer.to_json().encode("utf-8"))
  for name in SPLITS:
    docs = splits[name]
    h.update(f"\n{name} {len(docs)}\n".encode())
    for doc in docs:
      data = doc.encode("utf-8")
      h.update(len(data).to_bytes(8, "little"))
      h.update(data)
  return h.hexdigest()


def tokenize(
  docs: Sequence[str], tokenizer: Tokenizer, desc: str = "tokenizing"
) -> tuple[np.ndarray, np.ndarray]:
  """Encodes documents into one BOS/EOS-delimited stream.

  Returns:
    ``(tokens, starts)``: ``tokens`` in :func:`token_dtype`, ``starts`` int64.
  """
  dtype = token_dtype(tokenizer.vocab_size)
  pieces, lengths = [], []
  bos, eos = [tokenizer.bos_id], [tokenizer.eos_id]
  with tqdm.tqdm(total=len(docs), desc=desc, unit="doc", disable=None, leave=False) as bar:
    for i in range(0, len(docs), _CHUNK_DOCS):
      chunk = tokenizer.encode_batch(docs[i : i + _CHUNK_DOCS])
      pieces += [np.asarray(bos + ids + eos, dtype) for ids in chunk]
      lengths += [len(ids) + 2 for ids in chunk]
      bar.update(len(chunk))
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  starts = (
    np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
    if lengths
    else np.zeros(0, np.int64)
  )
  return tokens, starts


def _load(directory: str, reused: bool) -> TokenShards:
  splits = {
    name: TokenSplit(
      np.load(os.path.join(directory, f"{name}.tokens.npy"), mmap_mode="r"),
      np.load(os.path.join(directory, f"{name}.starts.npy")),
    )
    for name in SPLITS
  }
  return TokenShards(splits["train"], splits["val"], directory, reused)


def build_token_shards(
  train_docs: Sequence[str],
  val_docs: Sequence[str],
  tokenizer: Tokenizer,
  cache_dir: str,
  write: bool = True,
) -> TokenShards:
  """Tokenises both splits into ``cache_dir/<key>/``, or reuses what is there.

  Args:
    train_docs: cleaned training documents.
    val_docs: cleaned validation documents (may be empty).
    tokenizer: any :class:`~llm_mp.data.tokenizer.Tokenizer`.
    cache_dir: parent of the cache entries, typically ``<run dir>/data``.
    write: False tokenises in memory when the entry is missing and writes
      nothing (an evaluator on a read-only run directory).

  Returns:
    :class:`TokenShards` with memory-mapped tokens; ``reused`` says whether
    the entry already existed.
  """
  splits = {"train": train_docs, "val": val_docs}
  key = cache_key(splits, tokenizer)
  directory = os.path.join(cache_dir, key[:16])
  meta_path = os.path.join(directory, "meta.json")
  if os.path.isfile(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      if json.load(f).get("key") == key:
        return _load(directory, reused=True)
  if not write:
    splits = {
      name: TokenSplit(*tokenize(docs, tokenizer, desc=f"tokenizing {name}"))
      for name, docs in splits.items()
    }
    return TokenShards(splits["train"], splits["val"], directory, reused=False)
  meta = {"key": key, "format": FORMAT_VERSION, "vocab_size": tokenizer.vocab_size}
  for name, docs in splits.items():
    tokens, starts = tokenize(docs, tokenizer, desc=f"tokenizing {name}")
    for suffix, array in (("tokens", tokens), ("starts", starts)):
      write_atomic(
        os.path.join(directory, f"{name}.{suffix}.npy"),
        lambda f, a=array: np.save(f, a, allow_pickle=False),
      )
    meta[name] = {"documents": len(starts), "tokens": len(tokens), "dtype": str(tokens.dtype)}
  text = json.dumps(meta, indent=2)
  write_atomic(meta_path, lambda f: f.write(text.encode("utf-8")))
  return _load(directory, reused=False)
