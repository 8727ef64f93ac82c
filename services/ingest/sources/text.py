"""Text for language models: a file or a folder of files, tokenised to fixed-length sequences.

The tokenizer is byte-level (UTF-8 bytes are ids 0–255, 256 ends a document): no vocabulary to
learn or ship, and any text round-trips.  Documents are joined into one token stream and cut into
records of ``seq_len + 1`` tokens (inputs and shifted targets) that overlap by one token.

A file that is not UTF-8, holds NUL bytes (binary) or exceeds ``max_text_bytes`` is rejected
whole, with its path as the source and line 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from services.ingest.sources.common import Block, RejectLog, Source
from shared.schemas import TokenizerSpec

EOS = 256
RECORDS_PER_BLOCK = 4096


class TextSource(Source):
    format = "text"

    def blocks(self, rejects: RejectLog) -> Iterator[Block]:
        seq = self.request.seq_len
        self.tokenizer = TokenizerSpec(kind="bytes", vocab_size=257, eos_id=EOS, seq_len=seq)
        self.features = []
        width = seq + 1
        pending = np.zeros(0, dtype=np.int32)
        done = 0
        for path in self.paths:
            data = path.read_bytes()
            done += len(data)
            why = _problem(data, self.request.max_text_bytes)
            if why:
                rejects.add(str(path), 0, why)
                continue
            tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
            pending = np.concatenate([pending, tokens, np.array([EOS], dtype=np.int32)])
            # Records overlap by one token, so record k covers tokens [k·seq, k·seq + seq].
            n = (len(pending) - 1) // seq
            while n >= RECORDS_PER_BLOCK:
                yield self._cut(pending, RECORDS_PER_BLOCK, seq, width, done)
                pending = pending[RECORDS_PER_BLOCK * seq :]
                n = (len(pending) - 1) // seq
        n = (len(pending) - 1) // seq
        if n:
            yield self._cut(pending, n, seq, width, done)

    @staticmethod
    def _cut(tokens: np.ndarray, n: int, seq: int, width: int, done: int) -> Block:
        index = np.arange(n)[:, None] * seq + np.arange(width)[None, :]
        return Block({"tokens": tokens[index]}, done)


def _problem(data: bytes, limit: int) -> str | None:
    if len(data) > limit:
        return f"file of {len(data)} bytes is longer than max_text_bytes ({limit})"
    if b"\x00" in data:
        return "binary file (NUL bytes)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    return None
