"""Small helpers over JetStream key-value buckets."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)
WATCH_CHECK_S = 5.0  # how often a quiet watch checks that it has missed no change


async def open_bucket(js: JetStreamContext, bucket: str, *, create: bool = False, replicas: int = 1) -> KeyValue | None:
    """The bucket, or None when it does not exist (created instead when ``create``)."""
    try:
        return await js.key_value(bucket)
    except (NotFoundError, BucketNotFoundError):
        if not create:
            return None
        return await js.create_key_value(KeyValueConfig(bucket=bucket, storage=StorageType.FILE, replicas=replicas))


async def entries(kv: KeyValue, prefix: str = "") -> list[KeyValue.Entry]:
    """The live entries whose keys start with ``prefix`` (a whole token, ending in ``.``, or "").

    nats-py's ``KeyValue.keys()`` races: its watcher can signal "no more" before the entries
    already delivered have been handed over, so a full bucket reads as empty (seen in the suite).
    The stream's own per-subject index has no such race: the keys come from the server's stream
    info, then each value is read; a key deleted or purged meanwhile is skipped."""
    # nats-py keeps the bucket's stream and subject prefix private; this is their one reader.
    js: JetStreamContext = kv._js
    info = await js.stream_info(kv._stream, subjects_filter=f"{kv._pre}{prefix}>")
    found: list[KeyValue.Entry] = []
    for subject in sorted((info.state.subjects or {}).keys()):
        with contextlib.suppress(KeyNotFoundError):  # deleted, or purged
            found.append(await kv.get(subject[len(kv._pre) :]))
    return found


async def follow(
    kv: KeyValue,
    keys: str,
    apply: Callable[[KeyValue.Entry], Awaitable[None] | object],
    *,
    on_watching: Callable[[], None] | None = None,
    check_s: float = WATCH_CHECK_S,
) -> None:
    """Apply every change of ``keys`` (current values first, then updates, deletes with an empty
    value) for as long as the caller's task runs.  ``on_watching`` is called once the watch is
    set up (an owner's sign that a restarted watcher recovered); setting it up can raise (the
    bucket is gone, NATS is away), and the owner restarts it
    (:meth:`shared.service.Service.watch`).

    nats-py's watcher re-creates its consumer after a NATS restart, but in a cluster a watch went
    blind without an error (tests/test_multihost.py: after a partition healed, a trainer never
    saw its job start; likely its consumer was lost with the cut-off server and re-creating it
    failed while the stream elected a leader).  So every ``check_s`` the bucket's last change of ``keys`` is read;
    one still not applied at the next check means the watch is stalled, and it is set up again
    (current values first: ``apply`` must take a value it has seen, as every caller's does).

    An entry that ``apply`` cannot take (an undecodable record, say) is logged with its key and
    skipped: one bad record never ends the watch, or a service would go on reporting ready while
    blind to every later change."""
    watcher = await kv.watch(keys)
    if on_watching is not None:
        on_watching()
    task = asyncio.current_task()
    stall = _StallCheck(kv, keys, check_s)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=min(5.0, check_s))  # type: ignore[no-untyped-call]
            except Exception:  # a timeout, or a disconnect the watcher recovers from
                entry = None
            # Python 3.11's wait_for (inside nats-py's watcher) can swallow a cancellation that
            # lands as an update arrives: honour it here, or a draining service waits forever.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            if entry is not None:
                stall.applied(entry.revision or 0)
                await _apply(apply, entry)
            elif await stall.stalled():
                log.warning("%s: the watch of %s stopped getting changes; watching again", kv._stream, keys)
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]
                watcher = await kv.watch(keys)
    finally:  # cancelled (or the loop broke): the watch's subscription goes with it
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]


async def _apply(apply: Callable[[KeyValue.Entry], Awaitable[None] | object], entry: KeyValue.Entry) -> None:
    try:
        result = apply(entry)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.warning("%s: skipped %s at revision %s", entry.bucket, entry.key, entry.revision, exc_info=True)


class _StallCheck:
    """Whether a watch missed a change: the bucket's last change of ``keys`` is newer than what
    was applied, and still is ``check_s`` later (a change in flight arrives well within that)."""

    def __init__(self, kv: KeyValue, keys: str, check_s: float) -> None:
        self._kv = kv
        self._subjects = f"{kv._pre}{keys}"
        self.check_s = check_s
        self._seen = 0  # the last revision applied
        self._pending = 0  # a newer revision the last check found (0: none)
        self._next = time.monotonic() + check_s

    def applied(self, revision: int) -> None:
        self._seen = max(self._seen, revision)

    async def stalled(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.check_s
        if self._pending and self._seen < self._pending:
            self._pending = 0
            return True
        self._pending = 0
        try:
            last = await self._kv._js.get_last_msg(self._kv._stream, self._subjects)
        except Exception:  # no such key yet, or JetStream cannot answer now: ask at the next check
            return False
        if (last.seq or 0) > self._seen:
            self._pending = last.seq or 0
        return False


async def next_number(kv: KeyValue, key: str) -> int:
    """Hand out 1, 2, 3… under ``key``, safely against concurrent callers (compare-and-set)."""
    while True:
        try:
            entry = await kv.get(key)
            number = int((entry.value or b"0").decode()) + 1
            await kv.update(key, str(number).encode(), last=entry.revision)
            return number
        except KeyNotFoundError:
            try:
                await kv.create(key, b"1")
                return 1
            except KeyWrongLastSequenceError:
                continue
        except KeyWrongLastSequenceError:
            continue


class Lease:
    """One holder at a time of ``key`` among processes that call :meth:`hold` regularly (one
    autoscaling metrics instance among several, say).

    The holder renews with a compare-and-set on every call.  Another process takes over only when
    the key's revision has not moved for ``ttl_s`` by its *own* monotonic clock, so hosts' clocks
    need not agree.  :meth:`release` deletes the key, and the next caller takes it at once.  A
    holder that lost the key (it stalled past ``ttl_s``) finds another's id there and stands down.
    """

    def __init__(self, kv: KeyValue, key: str, holder: str, ttl_s: float) -> None:
        self.kv, self.key, self.holder, self.ttl_s = kv, key, holder.encode(), ttl_s
        self.revision: int | None = None  # of our last write, while we hold it
        self._seen: tuple[int, float] | None = None  # another's revision, and when we first saw it

    @property
    def held(self) -> bool:
        return self.revision is not None

    async def hold(self) -> bool:
        """Renew or take the lease if it is ours to have; True while this process holds it."""
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:  # never taken, or released (a delete marker)
            return await self._write(None)
        revision = entry.revision or 0
        if entry.value == self.holder:
            return await self._write(revision)
        self.revision = None
        now = time.monotonic()
        if self._seen is None or self._seen[0] != revision:
            self._seen = (revision, now)  # the holder renewed: it is alive
            return False
        return now - self._seen[1] >= self.ttl_s and await self._write(revision)

    async def release(self) -> None:
        """Give the lease up (if held), so another process need not wait out ``ttl_s``."""
        revision, self.revision = self.revision, None
        if revision is not None:
            with contextlib.suppress(Exception):  # taken meanwhile, or NATS away: it expires
                await self.kv.delete(self.key, last=revision)

    async def _write(self, last: int | None) -> bool:
        try:
            if last is None:
                self.revision = await self.kv.create(self.key, self.holder)
            else:
                self.revision = await self.kv.update(self.key, self.holder, last=last)
        except KeyWrongLastSequenceError:  # another process wrote first
            self.revision = None
        return self.revision is not None
