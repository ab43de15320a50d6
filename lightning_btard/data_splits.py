"""How the training data is split among peers: IID (every peer samples the whole set), Dirichlet label skew, or
shards. The split is public and seeded, so every peer computes everybody's part and a validator can still rebuild
any peer's batch (``verifiable_batches.py`` draws a peer's samples from its part).

- ``"dirichlet"`` (Hsu et al., 2019): for each class, its samples are dealt to the peers in proportions drawn from
  Dirichlet(``alpha``); small ``alpha`` (0.1) gives peers a few classes each, large ``alpha`` approaches IID.
- ``"shards"`` (McMahan et al., 2017): the samples sorted by label are cut into ``peers * shards_per_peer`` equal
  shards, and each peer gets ``shards_per_peer`` of them at random.

Peer ids beyond the initial peers (a hivemind joiner) take the part of ``id % peers``. A peer whose part came out
empty gets one random sample, so that every peer can train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np

from lightning_btard.errors import UserError

__all__ = ["DataSplit", "dataset_labels"]


@dataclass(frozen=True)
class DataSplit:
    """A split of the training data among peers (``BTARDStrategy(data_split={"kind": "dirichlet", "alpha": 0.5})``)."""

    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = 0.5
    shards_per_peer: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("iid", "dirichlet", "shards"):
            raise UserError(f"data_split kind must be 'iid', 'dirichlet' or 'shards', got {self.kind!r}")
        if not self.alpha > 0 or self.shards_per_peer < 1:
            raise UserError(f"need alpha > 0 and shards_per_peer >= 1, got {self.alpha} and {self.shards_per_peer}")

    @classmethod
    def of(cls, spec: Any) -> Optional["DataSplit"]:
        """From ``None``, a kind's name, a dict of the fields, or a DataSplit."""
        if spec is None or isinstance(spec, DataSplit):
            return spec
        if isinstance(spec, str):
            return cls(kind=spec)  # type: ignore[arg-type]
        if isinstance(spec, dict):
            unknown = set(spec) - {"kind", "alpha", "shards_per_peer", "seed"}
            if unknown:
                raise UserError(f"data_split has no field(s) {sorted(unknown)}: kind, alpha, shards_per_peer, seed")
            return cls(**spec)
        raise UserError(f"data_split must be a kind, a dict or None, got {spec!r}")

    def parts(self, labels: Sequence[int], peers: int) -> list[np.ndarray]:
        """Each peer's sample indices (sorted), a function of the labels, ``peers`` and the fields alone."""
        labels = np.asarray(labels, dtype=np.int64)
        n = len(labels)
        if peers < 1 or n < 1:
            raise UserError(f"a split needs peers >= 1 and a non-empty dataset, got {peers} peers and {n} samples")
        rng = np.random.default_rng(self.seed)
        if self.kind == "iid":
            chunks: list[list[int]] = [list(c) for c in np.array_split(rng.permutation(n), peers)]
        elif self.kind == "dirichlet":
            chunks = [[] for _ in range(peers)]
            for c in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == c))
                shares = rng.dirichlet(np.full(peers, self.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
                for peer, chunk in enumerate(np.split(members, cuts)):
                    chunks[peer].extend(chunk.tolist())
        else:
            order = np.argsort(labels, kind="stable")
            shards = np.array_split(order, peers * self.shards_per_peer)
            dealt = rng.permutation(len(shards)).reshape(peers, self.shards_per_peer)
            chunks = [[int(i) for s in row for i in shards[s]] for row in dealt]
        out = []
        for chunk in chunks:
            part = np.array(sorted(chunk), dtype=np.int64)
            out.append(part if len(part) else np.array([int(rng.integers(n))], dtype=np.int64))
        return out


def dataset_labels(dataset: Any) -> np.ndarray:
    """The labels of a map-style dataset: its ``targets`` or ``labels`` attribute (torchvision's datasets), through
    ``Subset``s, or else the second item of every sample (read once)."""
    indices = None
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch.utils.data.Subset
        indices = dataset.indices if indices is None else [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is not None:
            labels = np.asarray(values, dtype=np.int64)
            return labels if indices is None else labels[np.asarray(indices)]
    try:
        labels = np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise UserError(f"data_split needs the training samples' labels: a `targets` or `labels` attribute of the dataset, "
                        f"or (input, label) samples; {type(dataset).__name__} has neither ({type(e).__name__}: {e})") from e
    return labels if indices is None else labels[np.asarray(indices)]
