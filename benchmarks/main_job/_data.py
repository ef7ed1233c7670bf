"""Data for the benchmarks: nothing is downloaded, everything ships with Python or scikit-learn.

* scikit-learn's 8x8 handwritten digits (1797 images), split 60/20/20 into train,
  validation (tuning) and test (reporting);
* the English documentation text in the standard library's ``pydoc_data``
  (about 465k characters), split 80/10/10 into contiguous train, validation and test
  parts (so the held-out text is about topics the model never saw).

Every benchmark that trains on digits (the main job, ``momentum_precision_digits``,
``distributed_lion``, ``slow_link``) reads them through :func:`load_digits_splits`, so
all of them train, tune and report on the same images.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Split = tuple[np.ndarray, np.ndarray]


def load_digits_splits(split_seed: int = 0) -> dict[str, Split]:
    """Returns scikit-learn's digits as ``{"train", "val", "test"}`` -> (images, labels).

    Images are float32 ``[n, 8, 8, 1]`` scaled to [0, 1]; labels are int32. The split
    is a fixed stratification-free permutation (60/20/20) so every optimizer and seed
    sees the same held-out images.
    """
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(split_seed).permutation(len(y))
    n_val = n_test = len(y) // 5
    parts = {
        'test': order[:n_test],
        'val': order[n_test : n_test + n_val],
        'train': order[n_test + n_val :],
    }
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def load_pydoc_text() -> str:
    """Returns the standard library's documentation topics as one English text."""
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top

    return '\n\n'.join(topics.topics[key] for key in sorted(topics.topics))


@dataclasses.dataclass(frozen=True)
class CharCorpus:
    """A character-level corpus: vocabulary and integer-coded contiguous splits."""

    vocab: str  # index 0 is reserved for characters not seen in training
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def char_corpus(text: str, max_chars: int | None = None) -> CharCorpus:
    """Encodes ``text`` per character and splits it 80/10/10 (train/val/test).

    Args:
      text: the corpus.
      max_chars: keep only the first ``max_chars`` characters of each split's source
        range (used by tiny smoke runs); ``None`` keeps everything.

    Returns:
      A ``CharCorpus``; characters absent from the training part map to index 0.
    """
    n = len(text)
    bounds = {
        'train': (0, int(0.8 * n)),
        'val': (int(0.8 * n), int(0.9 * n)),
        'test': (int(0.9 * n), n),
    }
    pieces = {k: text[a:b] for k, (a, b) in bounds.items()}
    if max_chars is not None:
        pieces = {k: v[:max_chars] for k, v in pieces.items()}
    vocab = '\0' + ''.join(sorted(set(pieces['train']) - {'\0'}))
    index = {c: i for i, c in enumerate(vocab)}

    def encode(part: str) -> np.ndarray:
        return np.array([index.get(c, 0) for c in part], dtype=np.int32)

    return CharCorpus(vocab, *(encode(pieces[k]) for k in ('train', 'val', 'test')))


def lm_windows(tokens: np.ndarray, context: int) -> Split:
    """Cuts a token stream into non-overlapping (inputs, next-character targets)."""
    n = (len(tokens) - 1) // context
    x = tokens[: n * context].reshape(n, context)
    y = tokens[1 : n * context + 1].reshape(n, context)
    return x, y
