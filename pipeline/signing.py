"""Optional signatures on certification records (HMAC-SHA256 or Ed25519).

Without a configured key, certification records are bound to their version by the manifest's
sha256 only: anyone who can write the store can also write a record.  With a key, a record
must carry a valid signature to count as a certification (``pipeline.store.verify_chain``).

Configuration (environment, read at each call):

* ``PREFPIPE_SIGNING_KEY``       a shared secret (>= 16 bytes of text) -> HMAC-SHA256; the same
                                 secret signs (certify) and verifies (train, show, versions).
* ``PREFPIPE_SIGNING_KEY_FILE``  a file holding that secret, or an Ed25519 private key in PEM
                                 (``openssl genpkey -algorithm ed25519``) -> Ed25519 signatures.
* ``PREFPIPE_VERIFY_KEY_FILE``   an Ed25519 public key in PEM: machines that only verify
                                 (trainers) get the public key and can never sign.

What is signed: the canonical JSON (sorted keys, no whitespace) of the record without its
``signature`` fields, so every gate, the verdict, the policy hash, the version id and the
manifest sha256 are covered.  ``key_id`` (a hash of the public material) says which key
signed, so a record signed with another key is reported as such.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIGNATURE_FIELDS = ("signature", "signature_alg", "key_id")
MIN_SECRET_BYTES = 16


class SigningConfigError(ValueError):
    """The signing key settings cannot be used; the message names the variable and the problem."""


@dataclass(frozen=True)
class Keyring:
    """What this process can do: sign (secret or private key) and/or verify."""

    alg: str  # "hmac-sha256" | "ed25519"
    key_id: str
    secret: bytes | None = None  # HMAC
    private: Any = None  # Ed25519PrivateKey
    public: Any = None  # Ed25519PublicKey

    @property
    def can_sign(self) -> bool:
        return self.secret is not None or self.private is not None


def canonical_bytes(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in SIGNATURE_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def _hmac_ring(secret: bytes, source: str) -> Keyring:
    if len(secret) < MIN_SECRET_BYTES:
        raise SigningConfigError(f"{source}: the signing secret has {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
                                 "(e.g. `openssl rand -hex 32`)")
    key_id = "hmac:" + hashlib.sha256(b"prefpipe-key-id|" + secret).hexdigest()[:16]
    return Keyring("hmac-sha256", key_id, secret=secret)


def _ed25519_key_id(public: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(var: str) -> bytes:
    path = Path(os.environ[var])
    try:
        return path.read_bytes()
    except OSError as err:
        raise SigningConfigError(f"{var}={path}: cannot read the key file ({err.strerror or err})") from err


def load_keyring() -> Keyring | None:
    """The configured key, or None when signing is not configured.  A variable that is set but
    empty is an error, never "not configured": a key that failed to arrive (an empty secret
    mount, ``VAR=$(cat missing)``) must not turn signing off and make unsigned records count."""
    for var in ("PREFPIPE_SIGNING_KEY", "PREFPIPE_SIGNING_KEY_FILE", "PREFPIPE_VERIFY_KEY_FILE"):
        if var in os.environ and not os.environ[var].strip():
            raise SigningConfigError(f"{var} is set but empty: give the key, or unset the variable to work without "
                                     "signatures")
    if os.environ.get("PREFPIPE_SIGNING_KEY"):
        return _hmac_ring(os.environ["PREFPIPE_SIGNING_KEY"].encode("utf-8"), "PREFPIPE_SIGNING_KEY")
    if os.environ.get("PREFPIPE_SIGNING_KEY_FILE"):
        data = _read_key_file("PREFPIPE_SIGNING_KEY_FILE")
        if b"-----BEGIN" not in data:
            return _hmac_ring(data.strip(), "PREFPIPE_SIGNING_KEY_FILE")
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as err:
            raise SigningConfigError(f"PREFPIPE_SIGNING_KEY_FILE: not an unencrypted PEM private key ({err})") from err
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningConfigError("PREFPIPE_SIGNING_KEY_FILE: only Ed25519 private keys are supported "
                                     "(`openssl genpkey -algorithm ed25519 -out key.pem`)")
        public = private.public_key()
        return Keyring("ed25519", _ed25519_key_id(public), private=private, public=public)
    if os.environ.get("PREFPIPE_VERIFY_KEY_FILE"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        data = _read_key_file("PREFPIPE_VERIFY_KEY_FILE")
        try:
            public = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as err:
            raise SigningConfigError(f"PREFPIPE_VERIFY_KEY_FILE: not a PEM public key ({err})") from err
        if not isinstance(public, Ed25519PublicKey):
            raise SigningConfigError("PREFPIPE_VERIFY_KEY_FILE: only Ed25519 public keys are supported")
        return Keyring("ed25519", _ed25519_key_id(public), public=public)
    return None


def _cannot_sign() -> SigningConfigError:
    return SigningConfigError("only a verification key is configured (PREFPIPE_VERIFY_KEY_FILE): this machine cannot "
                              "sign certifications; set PREFPIPE_SIGNING_KEY or PREFPIPE_SIGNING_KEY_FILE")


def signing_keyring() -> Keyring | None:
    """The configured key when this process can sign with it, None when signing is not configured;
    a verify-only key raises :class:`SigningConfigError`.  Certify asks before any work, so a machine
    that cannot sign writes nothing (no GX run, no part facts)."""
    ring = load_keyring()
    if ring is not None and not ring.can_sign:
        raise _cannot_sign()
    return ring


def sign_record(record: dict[str, Any], ring: Keyring) -> dict[str, Any]:
    """The record with ``signature``, ``signature_alg`` and ``key_id`` set."""
    if not ring.can_sign:
        raise _cannot_sign()
    msg = canonical_bytes(record)
    if ring.alg == "hmac-sha256":
        sig = hmac.new(ring.secret, msg, hashlib.sha256).digest()
    else:
        sig = ring.private.sign(msg)
    return {**record, "signature": base64.b64encode(sig).decode("ascii"), "signature_alg": ring.alg, "key_id": ring.key_id}


def verify_record(record: dict[str, Any], ring: Keyring) -> str | None:
    """None when the record's signature is valid for this key, else why not."""
    sig_b64 = record.get("signature")
    if not sig_b64:
        return "the record is not signed, but signing is configured (records must carry a valid signature)"
    if record.get("signature_alg") != ring.alg or record.get("key_id") != ring.key_id:
        return (f"signed with another key ({record.get('signature_alg')} {record.get('key_id')}); "
                f"this machine verifies {ring.alg} {ring.key_id}")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except (ValueError, TypeError):
        return "the signature is not valid base64"
    msg = canonical_bytes(record)
    if ring.alg == "hmac-sha256":
        ok = hmac.compare_digest(sig, hmac.new(ring.secret, msg, hashlib.sha256).digest())
    else:
        from cryptography.exceptions import InvalidSignature

        try:
            ring.public.verify(sig, msg)
            ok = True
        except InvalidSignature:
            ok = False
    return None if ok else "the signature does not match the record (the record was edited after signing)"


__all__ = ["Keyring", "SigningConfigError", "canonical_bytes", "load_keyring", "sign_record", "signing_keyring",
           "verify_record"]
