"""Text from an input file, made safe to show: no raw control bytes, bounded length.

Reject reasons, column names, file names and parser messages can carry bytes of the input (a
CSV cell, a header, a row pyarrow quotes).  Shown as they are, escape sequences (``ESC[31m``,
``ESC]0;title BEL``) would drive the terminal of whoever runs ``aimesh ingest`` or reads the
service log, and a newline would break a NATS header.  Every such string goes through
:func:`printable` (or :func:`quoted`) before it leaves the ingest service: characters that are not
printable are written the way ``repr`` writes them (``\\x1b``, ``\\n``, ``\\u202e``), and the
result is cut to a bounded length.
"""

from __future__ import annotations

MESSAGE_CHARS = 400  # an error message
FIELD_CHARS = 200  # a reject's reason, column or source
VALUE_CHARS = 40  # an excerpt of one input value


def printable(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` with every non-printable character escaped, at most ``limit`` characters (plus
    a note of how many more there were)."""
    if text.isprintable() and len(text) <= limit:
        return text  # the common case, checked in C
    out: list[str] = []
    size = 0
    for i, ch in enumerate(text):
        piece = ch if ch.isprintable() else repr(ch)[1:-1]
        if size + len(piece) > limit:
            return "".join(out) + f"… ({len(text) - i} more characters)"
        out.append(piece)
        size += len(piece)
    return "".join(out)


def quoted(value: object, limit: int = VALUE_CHARS) -> str:
    """An input value quoted for a message, the way ``repr`` quotes it, cut to ``limit``
    characters: ``'oops'``, ``'\\x1b[31mred'``, ``'xxxxxxxx…'``."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit])[:-1] + "…" + repr(text[:limit])[-1]
