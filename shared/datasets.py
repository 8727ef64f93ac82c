"""Datasets in JetStream: manifests in the datasets bucket, record batches in the data stream.

Keys of the datasets bucket::

    manifest.<dataset>.<version>   a DatasetManifest (written last: visible means complete)
    latest.<dataset>               the newest complete version
    seq.<dataset>                  the last version number handed out

:class:`DatasetReader` is what the trainer uses: it reads a deterministic list of shards, in
order or shuffled by ``(seed, epoch)``, resumable from a position (epoch, offset).  It yields
numpy arrays (``torch.from_numpy`` takes them without a copy); ``shared`` never imports torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence

import msgspec
import numpy as np
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared.batches import batch_arrays, decode_batch
from shared.errors import NotFound
from shared.kv import entries
from shared.names import Names, dataset_latest_key, manifest_key, manifest_key_prefix
from shared.schemas import DatasetManifest

_manifest = msgspec.json.Decoder(DatasetManifest)
_json = msgspec.json.Encoder()


def encode_manifest(manifest: DatasetManifest) -> bytes:
    return _json.encode(manifest)


async def datasets_kv(js: JetStreamContext, names: Names) -> KeyValue:
    try:
        return await js.key_value(names.datasets_bucket)
    except (NotFoundError, KeyNotFoundError):
        raise NotFound("no datasets yet: the datasets bucket does not exist (is the ingest service running?)") from None


async def get_manifest(js: JetStreamContext, names: Names, dataset: str, version: str | None = None) -> DatasetManifest:
    """A dataset version's manifest; ``version`` None (or "latest") means the newest."""
    kv = await datasets_kv(js, names)
    if version in (None, "", "latest"):
        try:
            version = (await kv.get(dataset_latest_key(dataset))).value.decode()  # type: ignore[union-attr]
        except KeyNotFoundError:
            raise NotFound(f"no dataset named {dataset!r}") from None
    try:
        entry = await kv.get(manifest_key(dataset, str(version)))
    except KeyNotFoundError:
        raise NotFound(f"no version {version} of dataset {dataset!r}") from None
    return _manifest.decode(entry.value or b"")


async def list_manifests(js: JetStreamContext, names: Names) -> list[DatasetManifest]:
    kv = await datasets_kv(js, names)
    out = [_manifest.decode(entry.value or b"") for entry in await entries(kv, manifest_key_prefix())]
    out.sort(key=lambda m: (m.dataset, int(m.version) if m.version.isdigit() else 0))
    return out


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME[@VERSION]`` → (name, version or None)."""
    name, _, version = ref.partition("@")
    return name, version or None


class DatasetReader:
    """Reads a dataset version's shards from the data stream."""

    def __init__(self, js: JetStreamContext, names: Names, manifest: DatasetManifest) -> None:
        self.js = js
        self.names = names
        self.manifest = manifest

    @classmethod
    async def open(cls, js: JetStreamContext, names: Names, ref: str) -> DatasetReader:
        dataset, version = parse_ref(ref)
        return cls(js, names, await get_manifest(js, names, dataset, version))

    async def stream_shard(self, shard: int, *, idle_timeout_s: float = 10.0) -> AsyncIterator[dict[str, np.ndarray]]:
        """The stored batches of one shard, in order, as arrays (an ordered consumer)."""
        info = self.manifest.shards[shard]
        if info.batches == 0:
            return
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        sub = await self.js.subscribe(
            info.subject,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=queue.put,
            stream=self.names.data_stream,
        )
        try:
            for _ in range(info.batches):
                msg = await asyncio.wait_for(queue.get(), idle_timeout_s)
                yield batch_arrays(decode_batch(msg.data))
        finally:
            await sub.unsubscribe()

    async def load(self, shards: Sequence[int]) -> dict[str, np.ndarray]:
        """All records of ``shards``, concatenated in shard then record order."""
        parts: list[dict[str, np.ndarray]] = []
        for shard in shards:
            async for arrays in self.stream_shard(shard):
                parts.append(arrays)
        if not parts:
            return {
                c.name: np.zeros((0, *c.shape), dtype=object if c.dtype == "str" else c.dtype)
                for c in self.manifest.columns
            }
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    @staticmethod
    def epoch_batches(
        arrays: dict[str, np.ndarray],
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        offset: int = 0,
        drop_last: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Mini-batches of one epoch, shuffled by ``(seed, epoch)``, starting at record ``offset``
        of that epoch's order (how a resumed run picks up where a checkpoint left off)."""
        n = len(next(iter(arrays.values()))) if arrays else 0
        order = np.random.default_rng([seed, epoch]).permutation(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(offset, stop, batch_size):
            index = order[start : min(start + batch_size, stop)]
            yield {k: v[index] for k, v in arrays.items()}


def shards_for_rank(shards: int, rank: int, world: int) -> list[int]:
    """A rank's deterministic shard list: shard i belongs to rank i % world."""
    if shards < world:
        raise ValueError(f"{shards} shards cannot feed {world} ranks: ingest with --shards ≥ {world}")
    return [s for s in range(shards) if s % world == rank]
