"""The model registry against a real nats-server."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from shared.kv import open_bucket
from shared.names import Names
from shared.registry import get_version, register
from shared.schemas import ModelVersion


def _version(job_id: str) -> ModelVersion:
    return ModelVersion(
        model="digits",
        version="",
        artifact=f"models/digits/{job_id}.safetensors",
        factory="zoo.classifier:mlp",
        task="classify",
        dataset="digits@1",
        job_id=job_id,
    )


async def test_a_job_registers_one_version_however_many_attempts_finish(nc: NatsClient, names: Names) -> None:
    kv = await open_bucket(nc.jetstream(), names.registry_bucket, create=True)
    assert kv is not None
    first = await register(kv, _version("job-a"))
    again = await register(kv, _version("job-a"))  # a later attempt of the same job finishing
    other = await register(kv, _version("job-b"))
    assert (first.version, again.version, other.version) == ("1", "1", "2")
    assert (await get_version(kv, "digits")).version == "2"
    assert (await get_version(kv, "digits", "1")).artifact == "models/digits/job-a.safetensors"


async def test_pipelined_object_put_is_readable_by_the_standard_object_store(nc: object) -> None:
    import os

    from shared.names import Names
    from shared.registry import artifacts, put_object

    js = nc.jetstream()  # type: ignore[attr-defined]
    store = await artifacts(js, Names("objtest"))
    data = os.urandom(3 * 1024 * 1024 + 17)
    await put_object(store, "blob", data, chunk_size=256 * 1024)
    got = await store.get("blob")
    assert got.data == data and got.info.chunks == 13 and got.info.size == len(data)
    await put_object(store, "blob", b"small")
    assert (await store.get("blob")).data == b"small"
    stream = await js.stream_info("OBJ_objtest-artifacts")
    assert stream.state.messages == 2  # the replaced object's chunks were purged: 1 chunk + 1 meta
