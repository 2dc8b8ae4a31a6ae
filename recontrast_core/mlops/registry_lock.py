"""One writer at a time per registered model: a lock kept in the MLflow registry itself.

The MLflow server has no transactions, so :func:`model_lock` keeps the lock as a tag
(:data:`LOCK_TAG`) on the registered model; the alias operations of
:mod:`recontrast_core.mlops.registry` (register, promote, roll back) run under it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
import uuid
from typing import Optional

from ..errors import UserError

LOCK_TAG = "recontrast.lock"
LOCK_TTL_S = 120.0  # a holder that died frees the lock after this long
LOCK_SETTLE_S = 0.3  # written, then read back after this long: the last writer wins
LOCK_TIMEOUT_S = 300.0


class RegistryBusy(UserError):
    """Another writer held the model's lock for longer than the timeout."""


def _read_lock(client, model_name: str) -> Optional[dict]:
    raw = (client.get_registered_model(model_name).tags or {}).get(LOCK_TAG)
    if not raw:
        return None
    try:
        lock = json.loads(raw)
        return lock if isinstance(lock, dict) and "owner" in lock and "expires" in lock else None
    except ValueError:
        return None  # garbage in the tag: treat as free (it is overwritten below)


@contextlib.contextmanager
def model_lock(client, model_name: str, *, ttl_s: float = LOCK_TTL_S, timeout_s: float = LOCK_TIMEOUT_S):
    """Serialise registry writes (register, promote, roll back) for ``model_name``.

    The MLflow server has no transactions, so the lock is a tag on the registered model
    holding ``{"owner", "expires"}``: a writer waits while an unexpired lock of another
    owner is there, writes its own, waits :data:`LOCK_SETTLE_S` and reads it back; only the
    writer that reads its own owner back holds it (of concurrent writers the last one wins,
    the others see it and wait). Released (deleted) on exit, only if still ours."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout_s
    rng = random.Random(owner)
    while True:
        held = _read_lock(client, model_name)
        if held is None or held["owner"] == owner or float(held["expires"]) < time.time():
            if _write_lock(client, model_name, {"owner": owner, "expires": time.time() + ttl_s}):
                time.sleep(LOCK_SETTLE_S)
                back = _read_lock(client, model_name)
                if back is not None and back["owner"] == owner:
                    break
        if time.monotonic() > deadline:
            who = held["owner"] if held else "another writer"
            raise RegistryBusy(f"{model_name}: the registry is being changed by {who}; gave up after "
                               f"{timeout_s:.0f} s (its lock expires on its own after {ttl_s:.0f} s)")
        time.sleep(0.1 + rng.random() * 0.4)
    try:
        yield owner
    finally:
        current = _read_lock(client, model_name)
        if current is not None and current["owner"] == owner:
            try:
                client.delete_registered_model_tag(model_name, LOCK_TAG)
            except Exception as exc:  # already taken over after expiry: not ours to delete
                if not _is_conflict(exc):
                    raise


def _is_conflict(exc: Exception) -> bool:
    """A write that lost a race at the server (two inserts of one tag at once) or a tag
    already gone: both mean "someone else got there first"."""
    text = f"{getattr(exc, 'error_code', '')} {exc}"
    return any(s in text for s in ("UNIQUE constraint", "IntegrityError", "ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                                   "duplicate key"))


def _write_lock(client, model_name: str, lock: dict) -> bool:
    """Write the lock tag; False when a concurrent writer's insert won at the database."""
    try:
        client.set_registered_model_tag(model_name, LOCK_TAG, json.dumps(lock))
        return True
    except Exception as exc:
        if _is_conflict(exc):
            return False
        raise
