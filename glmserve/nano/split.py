"""The held-out split: a key (a user text, an arithmetic problem, a tool name, an argument key) is held out when it
hashes into one bucket of eight. A conversation with any held-out key is held out, so training never sees one."""

from __future__ import annotations

import hashlib

HELDOUT_BUCKETS = 8  # one key in eight is held out


def is_heldout(key: str) -> bool:
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % HELDOUT_BUCKETS == 0
