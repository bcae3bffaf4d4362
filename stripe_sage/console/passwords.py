"""Password hashing for the console's users: scrypt from the standard library (memory-hard,
salted), stored as ``scrypt$n$r$p$salt$hash`` so the cost can be raised later without breaking
the hashes already stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets

# OWASP's scrypt minimum (N=2^17, r=8, p=1) costs 128 MiB per login; 2^14 keeps a login under
# 50 ms on a small machine while still salting and stretching every guess.
N, R, P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"scrypt${N}${R}${P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(
        password.encode(),
        salt=bytes.fromhex(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(digest) // 2,
        maxmem=2**26,
    )
    return hmac.compare_digest(candidate.hex(), digest)
