"""Reading and cleaning a text corpus.

A corpus is a list of documents (``str``). :func:`read_documents` reads them
from files and directories; :func:`clean_documents` normalises and filters
them and counts what it removed; :func:`load_corpus` does both for a
:class:`~llm_mp.config.DataConfig`, falling back to the embedded standard
library corpus when ``cfg.paths`` is empty.

File formats (directories are searched recursively, in sorted path order, for
these two suffixes; other files in a directory are ignored):

* ``.txt``: documents are separated by two or more blank lines; a single blank
  line (a paragraph break) stays inside a document. A file without such a gap
  is one document.
* ``.jsonl``: one JSON object per line with a string field ``text``; blank
  lines are skipped.

Files must be UTF-8 (a leading byte-order mark is dropped). Every problem is a
:class:`DataError` with a one-line message naming the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
import warnings
from typing import Iterable, Sequence

from llm_mp.config import DataConfig
from llm_mp.data.files import DataError
from llm_mp.data.stdlib_corpus import default_corpus

SUFFIXES = (".txt", ".jsonl")

# Two or more blank lines (lines holding only spaces/tabs) end a .txt document.
_DOC_GAP = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
# Unicode category Cc (C0 and C1 controls) except \t and \n; \r is handled first.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class CorpusSummary:
  """What cleaning kept and removed.

  Attributes:
    documents: documents kept.
    characters: total characters (code points) in the kept documents.
    removed: documents dropped, by reason: ``"too_short"`` (fewer than
      ``min_doc_chars`` after cleaning), ``"duplicate"`` (same text as an
      earlier kept document), ``"max_docs"`` (beyond ``DataConfig.max_docs``).
    control_chars: control characters stripped from kept and removed documents.
    files: files read (0 for the embedded corpus).
    skipped_files: files skipped as non-UTF-8 (with ``skip_bad_files``).
  """

  documents: int
  characters: int
  removed: dict[str, int]
  control_chars: int = 0
  files: int = 0
  skipped_files: tuple[str, ...] = ()

  def __str__(self) -> str:
    """One line for a log, e.g. ``corpus: 812 documents, 1,534,201 chars; removed ...``."""
    removed = ", ".join(f"{n} {reason}" for reason, n in sorted(self.removed.items()) if n)
    line = f"corpus: {self.documents:,} documents, {self.characters:,} chars"
    if self.files:
      line += f" from {self.files} file(s)"
    line += f"; removed: {removed or 'none'}"
    if self.control_chars:
      line += f"; stripped {self.control_chars:,} control chars"
    if self.skipped_files:
      line += f"; skipped {len(self.skipped_files)} non-UTF-8 file(s)"
    return line


def _list_files(paths: Sequence[str]) -> list[str]:
  """Expands files and directories into a list of corpus files, in order."""
  files = []
  for path in paths:
    if not os.path.exists(path):
      raise DataError(f"data path not found: {path}")
    if os.path.isfile(path):
      if not path.endswith(SUFFIXES):
        raise DataError(f"{path}: unsupported file type (expected {' or '.join(SUFFIXES)})")
      files.append(path)
      continue
    found = []
    for root, dirs, names in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [
        os.path.join(root, n) for n in names if n.endswith(SUFFIXES) and not n.startswith(".")
      ]
    files += sorted(found)
  return files


def _decode(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 (first bad byte at offset {e.start})") from None
  return text.removeprefix("\ufeff")


def _parse_jsonl(path: str, text: str) -> list[str]:
  docs = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
    docs.append(record["text"])
  return docs


def read_documents(
  paths: Sequence[str], skip_bad_files: bool = False
) -> tuple[list[str], int, tuple[str, ...]]:
  """Reads raw documents from ``.txt``/``.jsonl`` files and directories.

  Args:
    paths: files or directories (searched recursively).
    skip_bad_files: if True, a non-UTF-8 file is skipped with a ``UserWarning``
      instead of raising.

  Returns:
    ``(documents, files_read, skipped_files)``; documents are uncleaned.

  Raises:
    DataError: a path does not exist, a file has an unsupported suffix, a file
      is not UTF-8 (naming the byte offset), or a ``.jsonl`` line is malformed.
  """
  docs, skipped = [], []
  files = _list_files(paths)
  for path in files:
    try:
      text = _decode(path)
    except DataError as e:
      if not skip_bad_files:
        raise
      warnings.warn(f"skipping {e}", stacklevel=2)
      skipped.append(path)
      continue
    if path.endswith(".jsonl"):
      docs += _parse_jsonl(path, text)
    else:
      docs += _DOC_GAP.split(text.replace("\r\n", "\n").replace("\r", "\n"))
  return docs, len(files) - len(skipped), tuple(skipped)


def clean_text(text: str) -> tuple[str, int]:
  """Returns ``(cleaned, n_control_chars_removed)`` for one document.

  Line endings become ``\\n``, the text is NFC-normalised, control characters
  other than ``\\n`` and ``\\t`` are deleted, and outer whitespace is stripped.
  """
  text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
  text, n_control = _CONTROL.subn("", text)
  return text.strip(), n_control


def clean_documents(
  docs: Iterable[str],
  min_doc_chars: int = 0,
  max_docs: int | None = None,
) -> tuple[list[str], CorpusSummary]:
  """Cleans documents (:func:`clean_text`) and drops short, duplicate and surplus ones.

  Args:
    docs: raw documents.
    min_doc_chars: documents with fewer characters after cleaning are dropped
      (empty ones always are).
    max_docs: keep at most this many documents (the first ones); None = all.

  Returns:
    The kept documents in their original order, and a :class:`CorpusSummary`.
  """
  kept, seen = [], set()
  removed = {"too_short": 0, "duplicate": 0, "max_docs": 0}
  n_control = 0
  for doc in docs:
    text, n = clean_text(doc)
    n_control += n
    if len(text) < max(min_doc_chars, 1):
      removed["too_short"] += 1
    elif text in seen:
      removed["duplicate"] += 1
    elif max_docs is not None and len(kept) >= max_docs:
      removed["max_docs"] += 1
    else:
      seen.add(text)
      kept.append(text)
  summary = CorpusSummary(
    documents=len(kept), characters=sum(map(len, kept)), removed=removed, control_chars=n_control
  )
  return kept, summary


def load_corpus(cfg: DataConfig) -> tuple[list[str], CorpusSummary]:
  """Reads and cleans the corpus that ``cfg`` describes.

  ``cfg.paths == ()`` selects :func:`~llm_mp.data.stdlib_corpus.default_corpus`.
  Uses ``cfg.skip_bad_files``, ``cfg.min_doc_chars`` and ``cfg.max_docs``.

  Raises:
    DataError: as :func:`read_documents`, or when no document survives cleaning.
  """
  if cfg.paths:
    raw, n_files, skipped = read_documents(cfg.paths, cfg.skip_bad_files)
  else:
    raw, n_files, skipped = default_corpus(), 0, ()
  docs, summary = clean_documents(raw, cfg.min_doc_chars, cfg.max_docs)
  summary = dataclasses.replace(summary, files=n_files, skipped_files=skipped)
  if not docs:
    where = ", ".join(cfg.paths) if cfg.paths else "the embedded corpus"
    raise DataError(
      f"empty corpus: no documents of at least {cfg.min_doc_chars} chars in "
      f"{where} ({n_files} file(s) read, {len(skipped)} skipped)"
    )
  return docs, summary
