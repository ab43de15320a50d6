"""A small, learnable stand-in for WikiText-103, written in WikiText's raw on-disk format.

``wiki.train.raw``, ``wiki.valid.raw`` and ``wiki.test.raw`` hold articles the way WikiText does: a
`` = Title = `` heading line, `` = = Section = = `` sub-headings, blank lines between them, and one
paragraph per line with spaces around punctuation. Each paragraph is a few sentences from templates
whose order is fixed (so sentence-order prediction is learnable) and whose words depend on the
article's subject (so masked tokens are predictable). It lets the ALBERT pipeline (tokenizer
training, sentence-order instances, masking, training, attacks) run offline and fast. It is NOT
WikiText-103: a ``SYNTHETIC`` marker file tells the datamodule so, and it warns loudly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["write_synthetic_wikitext", "SYNTHETIC_MARKER", "RAW_FILES"]

SYNTHETIC_MARKER = "SYNTHETIC"
RAW_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_PARAMS_FILE = "synthetic.json"
_FORMAT_VERSION = 1  # bump whenever the generated text changes, so stale directories are rewritten

_SYLLABLES = ["ka", "lo", "mi", "ren", "sa", "tor", "vel", "an", "dor", "is", "um", "bra", "gen", "hal", "qua"]
_PLACES = ["Northbridge", "Eastvale", "Rivermouth", "Highmoor", "Stonefield", "Westmarch", "Lakeside", "Greyhaven"]
_FIELDS = ["music", "painting", "physics", "history", "botany", "law", "medicine", "poetry"]
_THINGS = ["bridge", "library", "garden", "observatory", "theatre", "school", "museum", "harbour"]
_YEARS = list(range(1820, 1990))

# Each paragraph walks these in order; ``{n}`` is the subject, the other fields are drawn per article.
_PARAGRAPHS = [
    [
        "{n} was born in {place} in {year} .",
        "{n} grew up near the old {thing} of {place} .",
        "As a child {n} showed a talent for {field} .",
        "In {year2} {n} left {place} to study {field} .",
    ],
    [
        "At the academy {n} met {m} , who also studied {field} .",
        "Together they founded a society for {field} in {place2} .",
        "The society built a {thing} in {place2} in {year3} .",
        "The {thing} of {place2} is still known for its {field} .",
    ],
    [
        "Later {n} returned to {place} .",
        "There {n} wrote a book on {field} and the {thing} .",
        "{n} died in {place} in {year4} .",
        "A {thing} in {place} is named after {n} .",
    ],
]
_SECTIONS = ["Early life", "Career", "Later life"]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _article(rng: random.Random) -> list[str]:
    n, m = _name(rng), _name(rng)
    year = rng.choice(_YEARS[:-60])
    fields = dict(
        n=n, m=m, place=rng.choice(_PLACES), place2=rng.choice(_PLACES), thing=rng.choice(_THINGS),
        field=rng.choice(_FIELDS), year=year, year2=year + rng.randint(15, 22), year3=year + rng.randint(25, 35),
        year4=year + rng.randint(50, 80),
    )
    lines = [f" = {n} = ", ""]
    for section, templates in zip(_SECTIONS, _PARAGRAPHS):
        lines += [f" = = {section} = = ", ""]
        lines += [" " + " ".join(t.format(**fields) for t in templates), ""]
    return lines


def write_synthetic_wikitext(
    data_dir: str | Path, n_train: int = 400, n_valid: int = 40, n_test: int = 40, seed: int = 0
) -> Path:
    """Write ``n_train``/``n_valid``/``n_test`` synthetic articles as WikiText raw files under ``data_dir``.

    Idempotent: an existing directory written with the same parameters is left as it is. Returns ``data_dir``.
    """
    root = Path(data_dir)
    params = {"version": _FORMAT_VERSION, "n_train": n_train, "n_valid": n_valid, "n_test": n_test, "seed": seed}
    marker, params_file = root / SYNTHETIC_MARKER, root / _PARAMS_FILE
    if marker.is_file() and params_file.is_file() and json.loads(params_file.read_text()) == params:
        if all((root / name).is_file() for name in RAW_FILES.values()):
            return root
    if any((root / name).is_file() for name in RAW_FILES.values()) and not marker.is_file():
        raise FileExistsError(f"{root} holds WikiText files that are not synthetic; refusing to overwrite them")
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("validation", n_valid), ("test", n_test)):
        rng = random.Random(f"{seed}/{split}")
        lines = [""]
        for _ in range(count):
            lines += _article(rng)
        (root / RAW_FILES[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    params_file.write_text(json.dumps(params))
    marker.write_text("Synthetic stand-in for WikiText-103 written by datamodules.write_synthetic_wikitext; NOT WikiText.\n")
    return root
