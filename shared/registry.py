"""The model registry (bucket ``<prefix>-registry``) and the artifacts object store.

Keys::

    version.<model>.<n>     a ModelVersion (JSON)
    alias.<model>.<alias>   a version number; ``latest`` moves on every registration, others
                            (``stable``, …) move when someone says so
    seq.<model>             the last version number handed out (compare-and-set)
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.cluster import ensure_replicas
from shared.errors import NotFound
from shared.kv import entries, next_number
from shared.names import (
    Names,
    alias_key,
    alias_key_prefix,
    check_token,
    job_version_key,
    model_seq_key,
    version_key,
    version_key_prefix,
)
from shared.schemas import ModelVersion

_version = msgspec.json.Decoder(ModelVersion)
_json = msgspec.json.Encoder()


async def registry_kv(js: JetStreamContext, names: Names) -> KeyValue:
    try:
        return await js.key_value(names.registry_bucket)
    except (NotFoundError, BucketNotFoundError):
        raise NotFound("no models yet: the registry bucket does not exist (is a trainer running?)") from None


async def register(kv: KeyValue, version: ModelVersion) -> ModelVersion:
    """Store a new version of ``version.model`` (its number is assigned here) and move ``latest``.

    Once per training job: a job whose attempt registered and then regrouped (a lost heartbeat
    after the registration, say) finishes again in a later attempt, and that attempt gets the
    version already registered instead of a second number (key ``job.<model>.<job id>``)."""
    check_token(version.model, "model name")
    by_job = job_version_key(version.model, check_token(version.job_id, "job id")) if version.job_id else None
    if by_job is not None:
        try:
            return await get_version(kv, version.model, ((await kv.get(by_job)).value or b"").decode())
        except (KeyNotFoundError, NotFound):
            pass
    number = str(await next_number(kv, model_seq_key(version.model)))
    version = msgspec.structs.replace(version, version=number)
    await kv.put(version_key(version.model, number), _json.encode(version))
    if by_job is not None:
        await kv.put(by_job, number.encode())
    await kv.put(alias_key(version.model, "latest"), number.encode())
    return version


async def set_alias(kv: KeyValue, model: str, alias: str, version: str) -> None:
    check_token(alias, "alias")
    await get_version(kv, model, version)  # must exist
    await kv.put(alias_key(model, alias), version.encode())


async def get_version(kv: KeyValue, model: str, ref: str | None = None) -> ModelVersion:
    """``ref``: a version number, an alias, or None for ``latest``."""
    ref = ref or "latest"
    if not ref.isdigit():
        try:
            ref = (await kv.get(alias_key(model, ref))).value.decode()  # type: ignore[union-attr]
        except KeyNotFoundError:
            raise NotFound(f"model {model!r} has no version or alias {ref!r}") from None
    try:
        entry = await kv.get(version_key(model, ref))
    except KeyNotFoundError:
        raise NotFound(f"model {model!r} has no version {ref}") from None
    return _version.decode(entry.value or b"")


async def list_versions(kv: KeyValue) -> list[ModelVersion]:
    out = [_version.decode(entry.value or b"") for entry in await entries(kv, version_key_prefix())]
    out.sort(key=lambda v: (v.model, int(v.version)))
    return out


async def aliases(kv: KeyValue, model: str) -> dict[str, str]:
    prefix = alias_key_prefix(model)
    return {entry.key[len(prefix) :]: (entry.value or b"").decode() for entry in await entries(kv, prefix)}


async def artifacts(js: JetStreamContext, names: Names, replicas: int = 1, *, manage: bool = True) -> ObjectStore:
    """The artifacts object store, created with ``replicas`` if missing; an existing one with
    fewer replicas is raised to them when ``manage`` (the identity may update it)."""
    try:
        store = await js.object_store(names.artifacts_bucket)
        if manage:
            await ensure_replicas(js, f"OBJ_{names.artifacts_bucket}", replicas)
        return store
    except (NotFoundError, BucketNotFoundError):
        from nats.js.api import ObjectStoreConfig, StorageType

        return await js.create_object_store(
            names.artifacts_bucket, ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas)
        )


async def put_object(
    store: ObjectStore, name: str, data: bytes, *, chunk_size: int = 512 * 1024, window: int = 32
) -> None:
    """Store ``data`` as object ``name``, in the object store's own format (nats-py's
    ``ObjectStore.get`` and ``nats object get`` read it), but with the chunks published
    asynchronously, ``window`` awaiting their acks at once, instead of one round trip per 128 KiB
    chunk as ``ObjectStore.put`` does.  The meta message, which makes the object visible, is
    published only after every chunk is stored."""
    import base64
    import hashlib
    import json
    from datetime import UTC, datetime

    from nats.js.api import Header as JsHeader
    from nats.js.api import ObjectInfo, ObjectMetaOptions, PubAck
    from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TEMPLATE, OBJ_META_PRE_TEMPLATE

    js = store._js  # nats-py exposes no pipelined put; these are its own fields
    bucket = store._name
    try:
        previous = await store.get_info(name)
    except NotFoundError:
        previous = None
    nuid = js._nc._nuid.next().decode()
    chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid)
    view = memoryview(data)
    slots = asyncio.Semaphore(window)
    acks: list[asyncio.Future[PubAck]] = []
    try:
        for start in range(0, len(data), chunk_size):
            await slots.acquire()
            ack = await js.publish_async(chunk_subject, bytes(view[start : start + chunk_size]))
            ack.add_done_callback(lambda _: slots.release())
            acks.append(ack)
        await asyncio.gather(*acks)
    except BaseException:
        await js.purge_stream(store._stream, subject=chunk_subject)
        raise
    info = ObjectInfo(
        name=name,
        bucket=bucket,
        nuid=nuid,
        size=len(data),
        chunks=len(acks),
        mtime=datetime.now(UTC).isoformat(),
        options=ObjectMetaOptions(max_chunk_size=chunk_size),
        digest=OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()),
    )
    meta_subject = OBJ_META_PRE_TEMPLATE.format(bucket=bucket, obj=base64.urlsafe_b64encode(name.encode()).decode())
    await js.publish(meta_subject, json.dumps(info.as_dict()).encode(), headers={JsHeader.ROLLUP: "sub"})
    if previous is not None and not previous.deleted:
        await js.purge_stream(store._stream, subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=previous.nuid))
