"""Each prompt row's observation window: the question it ends with (host numpy, before any trace).

SnapKV scores the keys with the queries of the last ``window`` prompt tokens. When the prompt ends with a
question, the queries that matter are the question's: a fixed window of 32 also takes the last context
tokens before it, whose queries look at their own neighbourhood. On the real LM's needle retrieval the
window aligned to the question kept the fact more often at every budget and length, and never less
(``docs/retrieval.md``). The question-aligned window of a row is:

- ``question_len`` when the caller gives it (an int for every row, or one per row): the number of trailing
  prompt tokens that form the question, with the chat markup after it;
- otherwise the tokens after the row's last ``<|vision_end|>`` (a video / image question: Qwen's template
  puts the question text after the media), when there are any;
- otherwise (text only, nothing given) the fixed ``window``;

always clipped to ``[1, window]``: ``window`` stays the static size of the scoring computation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ObservationError", "question_window_lengths"]


class ObservationError(ValueError):
    """A ``question_len`` that cannot describe the prompt."""


def question_window_lengths(ids: np.ndarray, valid: np.ndarray, *, window: int, vision_end_id: int,
                            question_len=None) -> np.ndarray:
    """``[B]`` int32 window lengths in ``[1, window]`` for right-aligned ``ids [B, N]`` (``valid [B, N]``: real
    tokens); see the module doc for the rule."""
    lengths = valid.sum(axis=1)
    if question_len is not None:
        q = np.broadcast_to(np.asarray(question_len), lengths.shape)
        if not np.issubdtype(q.dtype, np.integer):
            raise ObservationError(f"question_len must hold integers, got dtype {q.dtype}")
        bad = np.flatnonzero((q < 1) | (q > lengths))
        if bad.size:
            r = int(bad[0])
            raise ObservationError(f"question_len={int(q[r])} for row {r} must lie in [1, {int(lengths[r])}] "
                                   f"(the row's prompt tokens)")
        return np.minimum(q, window).astype(np.int32)
    n = ids.shape[1]
    is_end = (ids == vision_end_id) & valid
    has_end = is_end.any(axis=1)
    last_end = n - 1 - np.argmax(is_end[:, ::-1], axis=1)
    after = np.where(has_end, n - 1 - last_end, 0)  # right-aligned: the row ends at position n - 1
    return np.where(after >= 1, np.minimum(after, window), window).astype(np.int32)
