"""The ALBERT tokenizer: albert-large-v2's from the hub or a local directory, or one trained on the corpus.

Training (``train_tokenizer=True``, for offline machines) uses the ``tokenizers`` library through
transformers' ``train_new_from_iterator`` on ALBERT's own pipeline (NFKD + lower-casing normalizer,
Metaspace pre-tokenizer, ``[CLS] A [SEP] B [SEP]`` template), so the result is a SentencePiece-style
Unigram tokenizer with ALBERT's special tokens at ALBERT's ids (``<pad>`` 0, ``<unk>`` 1, ``[CLS]`` 2,
``[SEP]`` 3, ``[MASK]`` 4). Its scores are rounded so that peers training it on separate machines get
the same tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["ALBERT_HUB_TOKENIZER", "SPECIAL_TOKENS", "load_tokenizer", "train_tokenizer", "tokenizer_digest"]

ALBERT_HUB_TOKENIZER = "albert/albert-large-v2"
SPECIAL_TOKENS = ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
_SCORE_DECIMALS = 6


def load_tokenizer(name_or_path: str) -> Any:
    """``AlbertTokenizerFast.from_pretrained(name_or_path)`` with one clear message when it is not available."""
    from transformers import AlbertTokenizerFast

    try:
        tokenizer = AlbertTokenizerFast.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    else:
        # transformers 5 does not fail when the files cannot be found: it returns a tokenizer of the special tokens alone
        if len(tokenizer) > len(SPECIAL_TOKENS):
            return tokenizer
        problem = f"no vocabulary found, only {len(tokenizer)} special tokens"
    raise FileNotFoundError(
        f"could not load the ALBERT tokenizer {name_or_path!r} ({problem}). "
        f"Online, the hub's {ALBERT_HUB_TOKENIZER!r} is downloaded once into the Hugging Face cache. Offline, either "
        "point tokenizer= at a directory holding it (AlbertTokenizerFast.save_pretrained), or set "
        "train_tokenizer=true to train a SentencePiece-style Unigram tokenizer on the corpus (not albert-large-v2's)."
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Any:
    """Train a Unigram tokenizer with ALBERT's pipeline on ``texts`` and save it to ``out_dir``."""
    from transformers import AlbertTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    seed_vocab = [(token, 0.0) for token in SPECIAL_TOKENS]
    trained = AlbertTokenizerFast(vocab=seed_vocab).train_new_from_iterator(_non_empty(texts), vocab_size=vocab_size)
    pieces = json.loads(trained.backend_tokenizer.to_str())["model"]["vocab"]
    if [p for p, _ in pieces[: len(SPECIAL_TOKENS)]] != list(SPECIAL_TOKENS):
        raise RuntimeError(f"the trained tokenizer does not start with ALBERT's special tokens: {pieces[:5]}")
    tokenizer = AlbertTokenizerFast(vocab=[(p, round(float(s), _SCORE_DECIMALS)) for p, s in pieces])
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tokenizer_digest(tokenizer: Any) -> str:
    """A short hash of everything that decides how ``tokenizer`` encodes text."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text and not text.isspace():
            yield text
