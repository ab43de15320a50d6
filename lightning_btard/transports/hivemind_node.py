"""One peer's presence in a hivemind swarm: its libp2p identity, DHT, P2P replica and event loop.

The identity is an RSA key written where ``hivemind.P2P`` reads it (``identity_path``), so that three
things are one: the libp2p peer id that authenticates this peer's RPCs (``context.remote_id``), the
owner marker of its DHT records (``RSASignatureValidator`` with *this* key, not the process-wide one),
and the peer id others derive from that marker (:func:`peer_id_of_owner`).

Lightning's training loop is synchronous; hivemind is asyncio. The node runs its own event loop in a
daemon thread and :meth:`HivemindNode.run` submits coroutines to it with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Optional, TypeVar

from cryptography.hazmat.primitives import serialization
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from lightning_btard.transports.base import TransportError
from lightning_btard.transports.codec import MAX_RECORD_BYTES
from lightning_btard.transports.hivemind_mailbox import Mailbox, MessageServicer
from lightning_btard.transports.hivemind_records import (
    INLINE_LIMIT,
    PUBLIC,
    RecordServicer,
    RecordStore,
    fetch_record,
    parse_reference,
)

__all__ = ["HivemindNode", "peer_id_of_owner"]

T = TypeVar("T")


def identity_bytes(key: RSAPrivateKey) -> bytes:
    """``key`` in p2pd's identity file format (what ``PeerID.from_identity`` reads)."""
    from hivemind.proto import crypto_pb2

    return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()


def write_identity(path: str, blob: bytes) -> None:
    """An identity file, readable by its owner only (p2pd's own convention)."""
    if os.path.exists(path):
        os.chmod(path, 0o600)
        os.unlink(path)
    with open(path, "wb") as f:
        f.write(blob)
    os.chmod(path, 0o400)


def _read_identity(path: str) -> RSAPrivateKey:
    from hivemind.proto import crypto_pb2

    with open(path, "rb") as f:
        data = crypto_pb2.PrivateKey.FromString(f.read()).data
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(data, password=None)
    return key


def peer_id_of_owner(marker: bytes) -> Optional[PeerID]:
    """The libp2p peer id whose RSA key is in an ``[owner:<ssh-rsa key>]`` DHT subkey (None if unreadable)."""
    from hivemind.proto import crypto_pb2

    prefix, suffix = b"[owner:", b"]"
    if not (isinstance(marker, bytes) and marker.startswith(prefix) and marker.endswith(suffix)):
        return None
    try:
        public = serialization.load_ssh_public_key(marker[len(prefix) : -len(suffix)])
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # noqa: BLE001 - any unreadable key (malformed, unsupported algorithm) names nobody
        return None
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(encoded).digest())  # multihash: sha2-256, 32 bytes


class HivemindNode:
    """A DHT node (its own process, as hivemind runs it), a P2P replica and an event loop thread.

    Args:
        initial_peers: multiaddresses of any running peers (none for the first peer).
        host_maddrs: where to listen; ``/ip4/0.0.0.0/tcp/0`` for other machines, loopback by default.
        announce_maddrs: the addresses others should dial, when they differ from ``host_maddrs``.
        identity_path: this peer's RSA key file (made if missing); a fresh temporary key by default.
        startup_timeout: seconds to wait for the DHT to start and reach ``initial_peers``.
        namespace: the RPC namespace (peers of one run use the same).
        max_message_bytes: a tensor message larger than this is refused as malformed.
        use_relay, use_auto_relay: libp2p circuit relays (hivemind's options): a peer behind a NAT is reached through
            a relay when it uses ``use_auto_relay`` and another peer relays (``use_relay``, on by default).
        client_mode: the DHT node serves no DHT requests (for peers that others cannot dial); it still needs a relay
            to receive the other peers' messages (``use_auto_relay``).
    """

    def __init__(
        self,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Optional[Sequence[str]] = None,
        identity_path: Optional[str] = None,
        startup_timeout: float = 60.0,
        namespace: str = "btard",
        max_message_bytes: int = 2**31,
        use_relay: bool = True,
        use_auto_relay: bool = False,
        client_mode: bool = False,
    ) -> None:
        self._tmpdir: Optional[tempfile.TemporaryDirectory] = None
        if identity_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="btard-identity-")
            identity_path = os.path.join(self._tmpdir.name, "identity.key")
        if not os.path.isfile(identity_path):
            write_identity(identity_path, identity_bytes(RSAPrivateKey()))
        self.private_key = _read_identity(identity_path)
        self.validator = RSASignatureValidator(self.private_key)
        deadline = time.monotonic() + startup_timeout
        while True:  # peers may start in any order: the bootstrap peer may not be listening yet
            try:
                self.dht = DHT(
                    initial_peers=list(initial_peers) or None, start=True, host_maddrs=list(host_maddrs),
                    announce_maddrs=list(announce_maddrs) if announce_maddrs else None, identity_path=identity_path,
                    record_validators=[self.validator], startup_timeout=startup_timeout, await_ready=True,
                    # tests start several nodes from one process: they share a key file directory, not an identity
                    check_if_identity_free=False, use_relay=use_relay, use_auto_relay=use_auto_relay,
                    client_mode=client_mode,
                )
                break
            except (P2PDaemonError, RuntimeError, TimeoutError) as e:
                if time.monotonic() + 1.0 < deadline and "bootstrap" in str(e):
                    time.sleep(1.0)
                    continue
                raise TransportError(
                    f"could not start a hivemind node or reach initial_peers={list(initial_peers)}: {e}. Check the "
                    "multiaddresses (the first peer prints them) and that the port is reachable."
                ) from e
        self.peer_id: PeerID = self.dht.peer_id
        expected = peer_id_of_owner(self.owner)
        if expected != self.peer_id:
            self.dht.shutdown()
            raise RuntimeError(f"hivemind's peer id {self.peer_id} is not the one of its identity key ({expected})")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="btard-hivemind", daemon=True)
        self._thread.start()
        self.p2p: P2P = self.run(self.dht.replicate_p2p(), timeout=startup_timeout)
        self.namespace = namespace
        self.mailbox = Mailbox(max_message_bytes=max_message_bytes)
        self.run(MessageServicer(self.mailbox).add_p2p_handlers(self.p2p, namespace=namespace), timeout=30)
        self.records = RecordStore()
        """This node's board records too large for the DHT (``hivemind_records.py``)."""
        self.run(RecordServicer(self.records).add_p2p_handlers(self.p2p, namespace=namespace), timeout=30)
        self._closed = False

    @property
    def owner(self) -> bytes:
        """This peer's owner marker: DHT subkeys holding it can only be written with its key."""
        return self.validator.local_public_key

    @property
    def visible_maddrs(self) -> list[str]:
        """The full multiaddresses (with ``/p2p/<peer id>``) that other peers pass as ``initial_peers``."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def serve(self, servicer: Any) -> None:
        """Register a hivemind ``ServicerBase``'s RPC handlers on this node (e.g. the group's state servicer)."""
        self.run(servicer.add_p2p_handlers(self.p2p, namespace=self.namespace), timeout=30)

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float]) -> T:
        """Run ``coro`` on the node's loop; :class:`TransportError` after ``timeout`` seconds."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError as e:
            future.cancel()
            raise TransportError(f"hivemind call did not finish within {timeout}s") from e

    def store(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` under ``key`` in this peer's own subkey (signed with its key); a value over
        ``hivemind_records.INLINE_LIMIT`` by reference, served from here (``hivemind_records.py`` says why)."""
        if len(value) > INLINE_LIMIT:
            value = self.records.put_public(value)
        # returns after the first replica took it; the others are written in the background
        return bool(self.dht.store(key, value, get_dht_time() + ttl, subkey=self.owner, await_all_replicas=False))

    def store_until(self, key: str, value: bytes, ttl: float, deadline: float) -> bool:
        """:meth:`store`, retried with back-off until it succeeds or ``deadline`` (``time.monotonic()``) passes: a DHT
        store fails when no replica answers in time."""
        delay = 0.02
        while not self.store(key, value, ttl):
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        return True

    def get_owned(self, key: str, resolve: bool = False) -> dict[PeerID, bytes]:
        """Every owner-signed entry under ``key``, by the writer's peer id (entries of other forms ignored); with
        ``resolve``, large values stored by reference are fetched from their writers (only where large values are
        expected: a writer that does not serve its reference costs the reader a few seconds each time)."""
        return {writer: value for writer, (_, value) in self.get_signed(key, resolve).items()}

    def get_signed(self, key: str, resolve: bool = False) -> dict[PeerID, tuple[bytes, bytes]]:
        """:meth:`get_owned`, each entry with its writer's owner marker (``[owner:<ssh-rsa key>]``): the RSA key that
        checks the writer's signatures outside the DHT (``groups/hivemind_chain.py``)."""
        found = self.dht.get(key, latest=True)
        out: dict[PeerID, tuple[bytes, bytes]] = {}
        if found is None or not isinstance(found.value, dict):
            return out
        for subkey, entry in found.value.items():
            writer = peer_id_of_owner(subkey)
            value = getattr(entry, "value", None)
            if writer is None or not isinstance(value, bytes):
                continue
            ref = parse_reference(value, PUBLIC) if resolve else None
            if ref is not None:  # a large value: its bytes from the writer, checked against the digest, or nothing
                if ref[1] > MAX_RECORD_BYTES:
                    continue
                try:
                    value = self.records.get(b"", ref[0], writer) if writer == self.peer_id else None
                    if value is None:
                        value = fetch_record(self, writer, b"", ref[0], ref[1], time.monotonic() + 3.0)
                except TransportError:
                    continue
            out[writer] = (subkey, value)
        return out

    def poll_owned(self, key: str, done: Callable[[dict[PeerID, bytes]], bool], deadline: float,
                   interval: float, resolve: bool = False) -> dict[PeerID, bytes]:
        """Read ``key``'s owner-signed entries until ``done(entries)`` or ``deadline`` (``time.monotonic()``); returns
        the last read (``done`` may raise to stop early)."""
        while True:
            entries = self.get_owned(key, resolve)
            if done(entries) or time.monotonic() > deadline:
                return entries
            time.sleep(interval)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self.p2p.shutdown(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.dht.shutdown()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
