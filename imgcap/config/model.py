"""Config tables of text, model and decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from imgcap.config.loader import require


@dataclass(frozen=True)
class TextConfig:
    """How captions are normalised and which words enter the vocabulary."""

    mode: Literal["standard", "seed"] = "standard"
    min_count: int = 5
    max_length: int = 40  # tokens, including <start>/<end>; longer captions are truncated

    def __post_init__(self) -> None:
        require(self.min_count >= 1, f"min_count must be >= 1, got {self.min_count}")
        require(self.max_length >= 3, f"max_length must be >= 3, got {self.max_length}")


@dataclass(frozen=True)
class ModelConfig:
    """The caption decoder (imgcap.model.decoder: merge, inject; imgcap.model.attention: attention)."""

    architecture: Literal["merge", "inject", "attention"] = "merge"
    embedding_dim: int = 256
    units: int = 256
    dropout: float = 0.5
    embedding_dropout: float = 0.0
    glove_path: str | None = None  # GloVe text file; its dimension must equal embedding_dim
    glove_trainable: bool = True
    # attention only (grid features): the width of the projected regions the decoder attends to and reads
    # (and of the attention's hidden layer), and the weight of the doubly stochastic penalty (0: off)
    attention_dim: int = 256
    attention_penalty: float = 1.0

    def __post_init__(self) -> None:
        require(self.embedding_dim > 0 and self.units > 0, "embedding_dim and units must be > 0")
        require(self.attention_dim > 0, f"attention_dim must be > 0, got {self.attention_dim}")
        require(self.attention_penalty >= 0, f"attention_penalty must be >= 0, got {self.attention_penalty}")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(0.0 <= self.embedding_dropout < 1.0, "embedding_dropout must be in [0, 1)")


@dataclass(frozen=True)
class DecodeConfig:
    """Caption generation (see imgcap.model.beam)."""

    beam_width: int = 3  # 1 means greedy decoding
    length_penalty: float = 0.0  # score = log p / length**length_penalty (0: plain log-probability)
    max_length: int = 30
    batch_size: int = 256
    no_repeat_ngram_size: int = 0  # n >= 2: no caption repeats a sequence of n words (0: off)

    def __post_init__(self) -> None:
        require(self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}")
        require(self.length_penalty >= 0, "length_penalty must be >= 0")
        require(self.max_length >= 1, "max_length must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.no_repeat_ngram_size == 0 or self.no_repeat_ngram_size >= 2,
                f"no_repeat_ngram_size must be 0 (off) or >= 2, got {self.no_repeat_ngram_size}")

    @property
    def label(self) -> str:
        """How captions were decoded, for reports: "greedy", "beam-3", "beam-5 (length penalty 0.7)",
        "beam-5 (length penalty 1, no repeated 3-grams)"."""
        notes = [f"length penalty {self.length_penalty:g}"] if self.length_penalty and self.beam_width > 1 else []
        if self.no_repeat_ngram_size:
            notes.append(f"no repeated {self.no_repeat_ngram_size}-grams")
        name = "greedy" if self.beam_width == 1 else f"beam-{self.beam_width}"
        return name + (f" ({', '.join(notes)})" if notes else "")
