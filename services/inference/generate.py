"""Text generation for the byte-level language models: tokens one at a time, UTF-8 decoded
incrementally (a character split over tokens comes out whole), stop sequences honoured (the
text is cut before the stop sequence, which is never sent).

A prompt longer than the model's context is cropped to its last ``context`` tokens (what the
model would read anyway), so any prompt that reaches a worker costs one context's work.  A
generation stops between two tokens once its ``cancel`` event is set (finish reason
``cancelled``)."""

from __future__ import annotations

import codecs
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shared.errors import BadRequest
from shared.schemas import FinishReason, GenerateRequest

EOS = 256
# Below this temperature sampling is greedy: dividing logits by 1e-300 gives inf and NaN
# probabilities, and at 1e-4 a logit gap of 0.01 already weighs e^100 to one.
MIN_TEMPERATURE = 1e-4


@dataclass
class Piece:
    text: str
    finish_reason: FinishReason | None = None
    tokens: int = 0  # generated so far


def check(req: GenerateRequest, context: int) -> None:
    if not 1 <= req.max_tokens <= 4096:
        raise BadRequest(f"max_tokens must be between 1 and 4096 (got {req.max_tokens})")
    if (
        not math.isfinite(req.temperature)
        or req.temperature < 0
        or (req.top_p is not None and not 0 < req.top_p <= 1)
        or (req.top_k is not None and req.top_k < 1)
    ):
        raise BadRequest(
            f"temperature must be a finite number ≥ 0 (got {req.temperature}), top_p in (0, 1] (got {req.top_p}),"
            f" top_k ≥ 1 (got {req.top_k})"
        )
    if not req.prompt:
        raise BadRequest("the prompt is empty")
    if len(req.stop) > 8 or any(not s for s in req.stop):
        raise BadRequest("at most 8 non-empty stop sequences")
    del context


def prompt_ids(prompt: str, context: int) -> list[int]:
    """The prompt's byte tokens, cropped to the last ``context`` of them (0: no limit)."""
    data = prompt.encode()
    return list(data[-context:] if context > 0 else data)


def pieces(model: torch.nn.Module, req: GenerateRequest, cancel: threading.Event | None = None) -> Iterator[Piece]:
    """Yield text as it is generated; the last piece carries the finish reason."""
    if cancel is not None and cancel.is_set():
        yield Piece("", "cancelled", 0)
        return
    context = getattr(model, "context", 0)
    tokens = torch.tensor([prompt_ids(req.prompt, context if isinstance(context, int) else 0)], dtype=torch.long)
    generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held = ""  # text not yet sent because it may be the start of a stop sequence
    longest_stop = max((len(s) for s in req.stop), default=0)
    stream = model.generate(
        tokens,
        req.max_tokens,
        temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0,
        top_k=req.top_k,  # type: ignore[operator]
        top_p=req.top_p,
        generator=generator,
    )
    count = 0
    for token in stream:
        count += 1
        if token == EOS:
            yield Piece(held + decoder.decode(b"", final=True), "stop", count)
            return
        held += decoder.decode(bytes([token]))
        for stop in req.stop:
            at = held.find(stop)
            if at >= 0:
                yield Piece(held[:at], "stop", count)
                return
        safe = len(held) - max(longest_stop - 1, 0)
        if safe > 0:
            yield Piece(held[:safe], None, count)
            held = held[safe:]
        if cancel is not None and cancel.is_set():  # checked before the next token is computed
            yield Piece("", "cancelled", count)
            return
    yield Piece(held + decoder.decode(b"", final=True), "length", count)
