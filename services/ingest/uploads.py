"""Uploads: files sent to the ingest service through the object store instead of named by path.

A client with no access to the service's filesystem puts the file into the ``<prefix>-uploads``
object store (``aimesh ingest --upload`` names it ``sha256-<hex>`` by its content) and submits
``IngestRequest(object=<name>)``.  The service copies the object into a private temp folder,
bounded by ``max_upload_bytes`` (checked on the object's size before the copy, and on the bytes
as they arrive), verifies the object store's sha256 digest, and ingests the copy like a path.

Objects expire after :data:`UPLOAD_TTL_S`; an upload is ingested once per job, so a later job
of the same file uploads it again (the CLI does).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, ObjectStore

from shared.cluster import ensure_replicas
from shared.errors import BadRequest, NotFound
from shared.names import Names

UPLOAD_TTL_S = 24 * 3600
CHUNK_TIMEOUT_S = 10.0


async def ensure_uploads(js: JetStreamContext, names: Names, replicas: int = 1) -> ObjectStore:
    """The uploads object store, created (file storage, objects kept :data:`UPLOAD_TTL_S`) if
    it does not exist."""
    try:
        store = await js.object_store(names.uploads_bucket)
        await ensure_replicas(js, f"OBJ_{names.uploads_bucket}", replicas)
        return store
    except (NotFoundError, BucketNotFoundError):
        config = ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas, ttl=UPLOAD_TTL_S)
        return await js.create_object_store(names.uploads_bucket, config)


async def upload_info(store: ObjectStore, name: str, max_bytes: int) -> ObjectInfo:
    """The object's metadata; 404 when there is none, 400 when it is over ``max_bytes``."""
    try:
        info = await store.get_info(name)
    except ObjectNotFoundError:
        raise NotFound(
            f"no upload named {name!r} in {store._name}: upload the file first (aimesh ingest --upload), "
            f"uploads are kept {UPLOAD_TTL_S // 3600} h"
        ) from None
    size = info.size or 0
    if size > max_bytes:
        raise BadRequest(
            f"upload {name!r} is {size} bytes, above max_upload_bytes ({max_bytes}): split the file, or raise "
            "[ingest] max_upload_bytes on the service"
        )
    return info


def file_name_of(info: ObjectInfo) -> str:
    """The uploader's file name, when it left one in the description (``aimesh ingest
    --upload`` does): only its final component, and only for the extension."""
    return Path(info.description or "").name


async def fetch_upload(store: ObjectStore, info: ObjectInfo, dest: Path, max_bytes: int) -> None:
    """Copy the object into ``dest`` (a new file), at most ``max_bytes``, checking its digest.

    Read with an ordered consumer on the object's chunk subject, the object store's own format
    (what nats-py's ``ObjectStore.get`` reads), with a timeout per chunk: an object whose chunks
    are gone fails instead of waiting forever.
    """
    size = info.size or 0
    expected = (info.digest or "").partition("=")[2].rstrip("=")
    h = hashlib.sha256()
    got = 0
    out = await asyncio.to_thread(dest.open, "xb")
    try:
        if size:
            subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=store._name, obj=info.nuid)
            sub = await store._js.subscribe(subject, ordered_consumer=True)
            try:
                while True:
                    msg = await sub.next_msg(timeout=CHUNK_TIMEOUT_S)
                    got += len(msg.data)
                    if got > min(size, max_bytes):
                        raise BadRequest(
                            f"upload {info.name!r} holds more than the {size} bytes its metadata says "
                            f"(or max_upload_bytes, {max_bytes}): upload it again"
                        )
                    h.update(msg.data)
                    await asyncio.to_thread(out.write, msg.data)
                    if not msg.metadata.num_pending:
                        break
            finally:
                await sub.unsubscribe()
    finally:
        await asyncio.to_thread(out.close)
    if got != size:
        raise BadRequest(f"upload {info.name!r} is incomplete ({got} of {size} bytes): upload it again")
    if base64.urlsafe_b64encode(h.digest()).decode().rstrip("=") != expected:
        raise BadRequest(f"upload {info.name!r} does not match its sha256 digest: upload it again")
