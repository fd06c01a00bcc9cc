"""Caption text: normalisation and the vocabulary.

Two normalisation modes:

- ``standard``: lowercase, strip punctuation, keep every word. The convention of the published Flickr8k
  results, so BLEU figures compare with the literature.
- ``seed``: the seed notebooks' cleaning: lowercase, strip punctuation, drop words with digits and
  one-letter words (so "a" disappears from every caption).

The vocabulary maps words to ids with four reserved tokens at fixed ids (``<pad>``=0, ``<unk>``=1,
``<start>``=2, ``<end>``=3); it is saved inside every model bundle so a bundle decodes identically anywhere.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TextMode = Literal["standard", "seed"]
TEXT_MODES: tuple[str, ...] = ("standard", "seed")

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
RESERVED = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(4)

# Hyphens and slashes join words ("t-shirt" -> "t shirt" would change counts), so they are removed like
# every other punctuation mark; apostrophes too ("dog's" -> "dogs"), as the seed notebooks do.
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalize(text: str, mode: TextMode = "standard") -> list[str]:
    """Tokenise one caption into lowercase words according to `mode` (see module docstring)."""
    if mode not in TEXT_MODES:
        raise ValueError(f"unknown text mode {mode!r}; choose one of {', '.join(TEXT_MODES)}")
    words = _PUNCTUATION.sub("", text.lower()).split()
    if mode == "seed":
        return [w for w in words if len(w) > 1 and w.isalpha()]
    return words


@dataclass(frozen=True)
class Vocabulary:
    """Words <-> ids. Ids 0..3 are the reserved tokens; the rest are words by descending count, then name."""

    words: tuple[str, ...]
    mode: TextMode = "standard"

    def __post_init__(self) -> None:
        if tuple(self.words[: len(RESERVED)]) != RESERVED:
            raise ValueError(f"a vocabulary must start with the reserved tokens {RESERVED}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary words must be unique")
        object.__setattr__(self, "_ids", {w: i for i, w in enumerate(self.words)})

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 5, mode: TextMode = "standard") -> Vocabulary:
        """A vocabulary of the words that occur at least `min_count` times in tokenised `captions`."""
        counts = Counter(w for caption in captions for w in caption)
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in RESERVED),
                      key=lambda w: (-counts[w], w))
        return cls(RESERVED + tuple(kept), mode)

    def __len__(self) -> int:
        return len(self.words)

    def id(self, word: str) -> int:
        return self._ids.get(word, UNK_ID)  # type: ignore[attr-defined]

    def encode(self, tokens: Sequence[str], max_length: int | None = None) -> list[int]:
        """`<start>` + word ids + `<end>`; truncated to `max_length` ids (keeping `<end>` last)."""
        ids = [START_ID] + [self.id(w) for w in tokens] + [END_ID]
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [END_ID]
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of `ids` up to the first `<end>`, without reserved tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i >= len(RESERVED):
                words.append(self.words[i])
        return words

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "words": list(self.words)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        return cls(tuple(data["words"]), data.get("mode", "standard"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
