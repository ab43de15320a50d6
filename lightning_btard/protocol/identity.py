"""Peer identities: a signing key per peer, so that messages can serve as evidence against their sender.

torch.distributed peers use Ed25519 keys (from ``cryptography``) exchanged on the public board at
start-up; the hivemind backend binds the signer to the peer's libp2p identity through its signed DHT records.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["Identity", "verify_signature"]


@dataclass
class Identity:
    """A peer's private signing key and its public key bytes."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def verify_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s signature of ``message`` (False for malformed keys or signatures)."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
