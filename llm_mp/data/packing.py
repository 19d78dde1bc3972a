"""Packing a token stream into fixed-length training rows.

Row ``r`` of a split with ``seq_len = T`` is the window
``tokens[r*T : r*T + T + 1]`` of its BOS/EOS-delimited stream: ``inputs`` are
the first ``T`` tokens, ``targets`` the last ``T``. Windows overlap by one
token, so every token but the stream's first (a BOS) is a target exactly once.
The last row is padded. Each row is a dict of ``int32[T]`` arrays:

* ``inputs``: token ids; ``pad_id`` where padded.
* ``targets``: the next token, or ``-1`` (ignored by the loss) where the next
  token belongs to another document (after an EOS comes the next BOS) or the
  stream ends. The loss mask is ``targets >= 0``.
* ``segment_ids``: 1, 2, 3, ... for each document present in the row, in
  order; 0 for padding. Attention stays within a segment.
* ``positions``: index of the token within its document, restarting at 0 at
  each document start. A document continued from the previous row restarts at
  0 too: the model never sees the previous row, and positions stay < ``T``.

Example, ``T = 4``, stream ``B a b E B c E`` (B = bos, E = eos)::

  row 0: inputs  B a b E    targets a b E -1   segments 1 1 1 1   positions 0 1 2 3
  row 1: inputs  B c P P    targets c E -1 -1  segments 1 1 0 0   positions 0 1 0 0
"""

from __future__ import annotations

import numpy as np

from llm_mp.data.files import DataError
from llm_mp.data.shards import TokenSplit

FIELDS = ("inputs", "targets", "segment_ids", "positions")


class PackedRows:
  """A split seen as rows of ``seq_len`` tokens; a grain random-access data source.

  Args:
    split: the token stream and document starts; must hold at least one document.
    seq_len: tokens per row, ``T``.
    pad_id: the id written into padded ``inputs``.
  """

  def __init__(self, split: TokenSplit, seq_len: int, pad_id: int):
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be >= 1")
    if split.num_tokens < 2:
      raise DataError(
        f"cannot pack {split.num_docs} documents ({split.num_tokens} tokens) "
        "into rows; add documents or change data.val_fraction"
      )
    self.split = split
    self.seq_len = seq_len
    self.pad_id = pad_id
    self._num_rows = -(-(split.num_tokens - 1) // seq_len)  # ceil: the last row is padded

  def __len__(self) -> int:
    return self._num_rows

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    """Row ``row`` (``0 <= row < len(self)``) as a dict of ``int32[T]``."""
    if not 0 <= row < len(self):
      raise IndexError(f"row {row} out of range for {len(self)} rows")
    return {k: v[0] for k, v in self.gather(np.array([row])).items()}

  def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Stacks rows into a batch.

    Args:
      rows: ``int[b]`` row indices; an index outside ``[0, len(self))``, e.g.
        ``-1``, gives a padding row (no targets, segment 0).

    Returns:
      ``{"inputs", "targets", "segment_ids", "positions"}``, each ``int32[b, T]``.
    """
    tokens, starts = self.split.tokens, self.split.starts
    n, t = len(tokens), self.seq_len
    rows = np.asarray(rows, np.int64)
    valid = (rows >= 0) & (rows < len(self))
    first = np.where(valid, rows, 0) * t  # (b,) stream index of each row's first token
    idx = first[:, None] + np.arange(t + 1)  # (b, T+1) stream index of each window token
    has_next = valid[:, None] & (idx[:, 1:] < n)  # (b, T) input has a target in the stream
    tok = tokens[np.minimum(idx, n - 1)].astype(np.int32)
    doc = np.searchsorted(starts, idx, side="right") - 1  # (b, T+1) document of each token
    same_doc = doc[:, 1:] == doc[:, :-1]
    doc_first = np.maximum(starts[doc[:, :-1]], first[:, None])  # position 0 of each input
    batch = {
      "inputs": np.where(has_next, tok[:, :-1], self.pad_id),
      "targets": np.where(has_next & same_doc, tok[:, 1:], -1),
      "segment_ids": np.where(has_next, doc[:, :-1] - doc[:, :1] + 1, 0),
      "positions": np.where(has_next, idx[:, :-1] - doc_first, 0),
    }
    return {k: v.astype(np.int32) for k, v in batch.items()}
