"""API keys for the HTTP services (the router's gateway, the metrics service's dashboard).

A configuration entry is one of::

    KEY:scope                      a key in plain text (hashed at load, the text is not kept)
    sha256:<64 hex digits>:scope   the SHA-256 digest of the key, so no file holds the key itself

Only the digests are kept in memory.  A presented key is hashed and compared with
:func:`hmac.compare_digest` against every configured digest, with no early exit, so neither the
key's text nor which entry matched shows in the time taken.

A client presents its key as ``Authorization: Bearer KEY``, ``X-API-Key: KEY``, or as the
password of HTTP Basic authentication (any user name), which is what a browser sends when the
metrics dashboard asks for a login.

Produce a hashed entry (the key is read from standard input, so it stays out of shell history)::

    python -m shared.apikeys new admin     # a new random key, and its config entry
    python -m shared.apikeys hash admin    # the config entry of a key typed on stdin
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import sys
from collections.abc import Collection, Mapping, Sequence

from shared.names import Header

HASHED_PREFIX = "sha256:"


def digest(key: str) -> bytes:
    """The SHA-256 digest of a key, as configured entries store it."""
    return hashlib.sha256(key.encode()).digest()


def hashed_entry(key: str, scope: str) -> str:
    """The configuration entry for ``key`` that holds only its digest."""
    return f"{HASHED_PREFIX}{digest(key).hex()}:{scope}"


class KeyRing:
    """The configured keys as (digest, scope) pairs; empty means no key is asked for."""

    def __init__(self, entries: Sequence[tuple[bytes, str]] = ()) -> None:
        self._entries = tuple(entries)

    @classmethod
    def parse(cls, entries: Sequence[str], scopes: Collection[str]) -> KeyRing:
        """``["k1:admin", "sha256:<hex>:infer"]`` → a key ring; ``ValueError`` naming a bad
        entry (without echoing a plain-text key)."""
        parsed: list[tuple[bytes, str]] = []
        allowed = " or ".join(sorted(scopes))
        form = f"KEY:SCOPE or sha256:<64 hex digits>:SCOPE, SCOPE being {allowed}"
        for n, entry in enumerate(entries, 1):
            secret, _, scope = entry.rpartition(":")
            if scope not in scopes:
                raise ValueError(f"entry {n} is not {form}")
            if not secret:
                raise ValueError(f"entry {n} has an empty key")
            if secret.startswith(HASHED_PREFIX):
                hexdigest = secret[len(HASHED_PREFIX) :]
                try:
                    value = bytes.fromhex(hexdigest)
                except ValueError:
                    value = b""
                if len(value) != 32:
                    raise ValueError(f"entry {n} is not {form}: the digest must be 64 hex digits")
            else:
                value = digest(secret)
            if any(hmac.compare_digest(value, d) for d, _ in parsed):
                raise ValueError(f"entry {n} repeats a key listed before it")
            parsed.append((value, scope))
        return cls(parsed)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def scope_of(self, presented: str | None) -> str | None:
        """The scope of the presented key, or None when it is missing or unknown.  Every entry is
        compared (constant time per entry, no early exit)."""
        if not presented:
            return None
        wanted = digest(presented)
        found = None
        for value, scope in self._entries:
            if hmac.compare_digest(value, wanted):
                found = scope
        return found


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``Authorization: Bearer``, ``X-API-Key``, or the password of
    ``Authorization: Basic``."""
    auth = headers.get("Authorization", "")
    scheme, _, credentials = auth.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return credentials.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return headers.get(Header.API_KEY) or None


def main(argv: Sequence[str] | None = None) -> int:
    """``new SCOPE`` prints a new random key and its hashed entry; ``hash SCOPE`` prints the hashed
    entry of the key read from standard input."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("new", "hash"):
        print("usage: python -m shared.apikeys new|hash SCOPE   (hash reads the key from stdin)", file=sys.stderr)
        return 2
    command, scope = args
    if command == "new":
        key = secrets.token_urlsafe(32)
        print(f"key:   {key}")
        print(f"entry: {hashed_entry(key, scope)}")
        return 0
    key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("no key on standard input", file=sys.stderr)
        return 2
    print(hashed_entry(key, scope))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
