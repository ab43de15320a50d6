"""ALBERT pre-training instances: sentence splitting and sentence-order (SOP) pairs, as the released BTARD code.

Per document (one non-empty line of WikiText), the sentences are accumulated until their tokens reach
``max_seq_length`` or the document ends; a chunk of at least two sentences is cut at a random point into
segments A and B (one sentence at least each), which are swapped with probability 0.5 (label 1 when
swapped), and the pair is tokenized with truncation to ``max_seq_length`` and a special-tokens mask.
A chunk of a single sentence gives no instance. The random choices come from a generator seeded by
(seed, split, document index), so the instances do not depend on batching or worker count.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["SPLITTERS", "sentence_splitter", "split_sentences_regex", "sentence_order_pairs", "InstanceBuilder"]

_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "no", "mt", "ft", "gen", "col", "lt", "capt", "sgt",
    "gov", "rev", "inc", "co", "ltd", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
    "nov", "dec", "e.g", "i.e", "etc", "approx", "fig", "vol",
}
# A sentence ends at . ! or ? (maybe followed by closing quotes/brackets), then whitespace, then what may
# start a sentence: an upper-case letter, a digit, or an opening quote/bracket.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S*)[.!?][\"')\]]*$")


def split_sentences_regex(text: str) -> list[str]:
    """Split ``text`` into sentences without any downloaded model (the offline splitter).

    Does not split after abbreviations (``Dr.``, ``e.g.``), single initials (``J. Smith``) or dotted acronyms
    (``U.S.``). WikiText writes a sentence's final stop as a separate token (``in 2010 . It``), which this
    handles like ordinary text.
    """
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        last = _LAST_WORD.search(text[start : m.start() + 1])
        word = last.group(1) if last else ""
        if word and (word.lower().rstrip(".") in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or "." in word):
            continue
        sentence = text[start : m.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _split_punkt(text: str) -> list[str]:
    from lightning_btard.extras import require

    nltk = require("nltk", "sentence_splitter='punkt'")
    try:
        return nltk.sent_tokenize(text)
    except LookupError as e:
        raise RuntimeError(
            "sentence_splitter='punkt' needs nltk's punkt data, which is not installed on this machine. Download it once "
            "with `python -m nltk.downloader punkt_tab` (needs internet), or use sentence_splitter='regex' (offline). "
            "Every peer must use the same splitter, or validators will rebuild different batches."
        ) from e


SPLITTERS: dict[str, Callable[[str], list[str]]] = {"regex": split_sentences_regex, "punkt": _split_punkt}


def sentence_splitter(name: str) -> Callable[[str], list[str]]:
    """The splitter called ``name``: ``"regex"`` (offline, the default) or ``"punkt"`` (nltk, as the released code)."""
    try:
        return SPLITTERS[name]
    except KeyError:
        raise ValueError(f"unknown sentence_splitter {name!r}; choose one of {sorted(SPLITTERS)}") from None


def sentence_order_pairs(
    sentences: Sequence[str], lengths: Sequence[int], max_seq_length: int, rng: random.Random
) -> list[tuple[list[str], list[str], int]]:
    """The (segment A, segment B, label) pairs of one document: label 1 when A and B were swapped.

    ``lengths[i]`` is the number of tokens of ``sentences[i]``. This is the released code's
    ``create_instances_from_document`` without the tokenization.
    """
    pairs: list[tuple[list[str], list[str], int]] = []
    chunk: list[str] = []
    length = 0
    for i, (sentence, n) in enumerate(zip(sentences, lengths)):
        chunk.append(sentence)
        length += n
        if i == len(sentences) - 1 or length >= max_seq_length:
            if len(chunk) > 1:
                a_end = rng.randint(1, len(chunk) - 1)
                a, b = chunk[:a_end], chunk[a_end:]
                swapped = rng.random() < 0.5
                pairs.append((b, a, 1) if swapped else (a, b, 0))
            chunk, length = [], 0
    return pairs


class InstanceBuilder:
    """The batched ``datasets.map`` function turning documents (``text`` rows) into tokenized SOP instances.

    Output columns: ``input_ids``, ``token_type_ids``, ``special_tokens_mask`` and ``sentence_order_label``
    (the attention mask is all ones and is rebuilt at padding time).
    """

    def __init__(self, tokenizer: Any, max_seq_length: int, splitter: str, seed: int, split: str) -> None:
        if max_seq_length < 8:
            raise ValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.splitter = splitter
        self.seed = seed
        self.split = split

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        split = sentence_splitter(self.splitter)
        docs = [(i, split(text)) for i, text in zip(indices, batch["text"]) if text and not text.isspace()]
        flat = [s for _, sentences in docs for s in sentences]
        counts = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        first, second, labels = [], [], []
        pos = 0
        for index, sentences in docs:
            lengths = [len(ids) for ids in counts[pos : pos + len(sentences)]]
            pos += len(sentences)
            rng = random.Random(f"{self.seed}/{self.split}/{index}")
            for a, b, label in sentence_order_pairs(sentences, lengths, self.max_seq_length, rng):
                first.append(" ".join(a))
                second.append(" ".join(b))
                labels.append(label)
        if not first:
            return {"input_ids": [], "token_type_ids": [], "special_tokens_mask": [], "sentence_order_label": []}
        enc = self.tokenizer(
            first,
            second,
            truncation="longest_first",
            max_length=self.max_seq_length,
            return_token_type_ids=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
        )
        return {
            "input_ids": enc["input_ids"],
            "token_type_ids": enc["token_type_ids"],
            "special_tokens_mask": enc["special_tokens_mask"],
            "sentence_order_label": labels,
        }
