"""Training state for a joining peer (hivemind backend): what is shipped, how it is checked, how it travels.

A member offers its Lightning checkpoint (the dict ``ModelCheckpoint`` would save) as plain data: msgpack
with tensors (:func:`encode_record`), never a pickle, so a Byzantine member can send wrong numbers but cannot
run code on the joiner. What every honest member holds identically — the parameters, the optimizer and
scheduler states, the precision plugin's state (the loss scale), the step and the epoch — is summarised by
:func:`shared_state_digest`; the joiner loads a checkpoint only when its digest is the one a majority of the
members published (see :mod:`.hivemind_admission`). Buffers (BatchNorm statistics), loop counters and
callback states are the serving member's own, as rank 0's buffers are at the start of a run.

The checkpoint is streamed from the member's event loop (``rpc_download_state``, ``transports/hivemind_streams.py``) in 512 KiB chunks while its
training thread waits for the joiner in the next collective.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, AsyncIterator, Iterator, Optional

from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer
from torch import Tensor

from lightning_btard.protocol.digest import digest
from lightning_btard.transports.base import TransportError
from lightning_btard.transports.hivemind_streams import receive_sized, send_sized

__all__ = ["StateOffers", "StateServicer", "download_state", "serve_states", "shared_state", "shared_state_digest", "to_plain"]

def to_plain(obj: Any, path: str = "checkpoint") -> Any:
    """``obj`` as the plain data a board record holds: dicts (their subclasses too), lists, tuples, numbers,
    strings, bytes, None and tensors; paths become strings. Anything else raises ``TypeError`` naming where."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{path}: a key of type {type(key).__name__} cannot be sent to a joining peer")
            out[key] = to_plain(value, f"{path}[{key!r}]")
        return out
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{path}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [to_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy scalars
        return obj.item()
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be sent to a joining peer (plain data and tensors only)")


def shared_state(checkpoint: Mapping[str, Any], parameter_names: Sequence[str], precision_key: str) -> dict[str, Any]:
    """The part of a checkpoint that every honest member holds identically."""
    weights = checkpoint.get("state_dict", {})
    return {
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "parameters": {name: weights.get(name) for name in parameter_names},
        "optimizer_states": checkpoint.get("optimizer_states"),
        "lr_schedulers": checkpoint.get("lr_schedulers"),
        "precision": checkpoint.get(precision_key),
    }


def _items(obj: Any) -> Iterator[Any]:
    """Plain data as a flat sequence of :func:`digest` items: each container a marker with its kind and length, then
    its contents in order. Markers are strings; string leaves carry a prefix no marker has, so no two values share a
    sequence."""
    if isinstance(obj, Mapping):
        yield f"dict:{len(obj)}"
        for key, value in obj.items():
            yield from _items(key)
            yield from _items(value)
    elif isinstance(obj, (list, tuple)):
        yield f"{type(obj).__name__}:{len(obj)}"
        for value in obj:
            yield from _items(value)
    elif obj is None or isinstance(obj, bool):
        yield f"const:{obj}"
    elif isinstance(obj, str):
        yield "'" + obj
    else:  # tensors, bytes, ints, floats: digest's own encodings
        yield obj


def shared_state_digest(checkpoint: Mapping[str, Any], parameter_names: Sequence[str], precision_key: str) -> bytes:
    """The digest of :func:`shared_state` (32 bytes): equal on every member in sync, whatever its buffers and loggers."""
    return digest(*_items(to_plain(shared_state(checkpoint, parameter_names, precision_key))))


class StateOffers:
    """The checkpoint a member offers to joiners, by step (one at a time: a new offer replaces the old)."""

    def __init__(self) -> None:
        self.step: Optional[int] = None
        self.data: bytes = b""

    def offer(self, step: int, data: bytes) -> None:
        self.step, self.data = int(step), data

    def withdraw(self) -> None:
        self.step, self.data = None, b""


class StateServicer(ServicerBase):
    """The ``rpc_download_state`` handler: streams the offered checkpoint of the requested step (nothing if none)."""

    _rpc_handlers = None  # ServicerBase caches handlers per class: subclasses start with their own
    _stub_type = None

    def __init__(self, offers: StateOffers) -> None:
        self.offers = offers

    async def rpc_download_state(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        try:
            step = int(MSGPackSerializer.loads(request.metadata))
        except (ValueError, TypeError):
            return
        if self.offers.step != step:
            return
        data = self.offers.data  # a new offer swaps the object: this stream keeps sending the one it started
        async for reply in send_sized(data):
            yield reply


def serve_states(node: Any) -> StateOffers:
    """Serve training states from ``node``: what the returned offers hold, joining peers can download."""
    offers = StateOffers()
    node.serve(StateServicer(offers))
    return offers


async def _download(p2p: Any, peer: PeerID, namespace: str, step: int, max_bytes: int) -> bytes:
    stub = StateServicer.get_stub(p2p, peer, namespace=namespace)
    stream = await stub.rpc_download_state(runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps(int(step))))

    def refuse(size: int) -> Optional[str]:
        return None if 0 <= size <= max_bytes else f"peer {peer} announced a state of {size} bytes (at most {max_bytes} accepted)"

    try:
        data = await receive_sized(stream, refuse)
    except TransportError as e:
        raise TransportError(f"peer {peer}'s state: {e}") from e
    if data is None:
        raise TransportError(f"peer {peer} has no state of step {step} to offer")
    return data


def download_state(node: Any, peer: PeerID, step: int, timeout: float, max_bytes: int = 2**34) -> bytes:
    """The checkpoint bytes ``peer`` offers for ``step`` (:class:`TransportError` if none, short, or late)."""
    started = time.monotonic()
    try:
        return node.run(asyncio.wait_for(_download(node.p2p, peer, node.namespace, step, max_bytes), timeout), timeout=timeout + 5)
    except (asyncio.TimeoutError, TimeoutError) as e:
        raise TransportError(f"no state from {peer} within {time.monotonic() - started:.0f}s") from e
    except TransportError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken stream or an unreachable peer: try another member
        raise TransportError(f"downloading the state from {peer} failed: {e!r}") from e
