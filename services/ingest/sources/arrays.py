"""NumPy files: ``.npy`` (one array: the features) and ``.npz`` (named arrays sharing their first
dimension; the label array is ``--label`` or one named y/label/labels/target).  A record whose
features hold NaN or ±inf is rejected with its index as the line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from services.ingest.sources.common import (
    Block,
    LabelEncoder,
    RejectLog,
    Source,
    bad_float_rows,
    label_array,
    label_kind,
)
from shared.errors import BadRequest

BLOCK_RECORDS = 16384
_LABEL_NAMES = ("y", "label", "labels", "target")


class _ArraySource(Source):
    def _arrays(self) -> list[tuple[Path, dict[str, np.ndarray]]]:
        raise NotImplementedError

    def blocks(self, rejects: RejectLog) -> Iterator[Block]:
        encoder = LabelEncoder(self.label_classes)
        done = 0
        for path, arrays in self._arrays():
            label = self.label
            n = len(next(iter(arrays.values())))
            features = {k: v for k, v in arrays.items() if k != label}
            kind = label_kind(arrays[label].dtype) if label else ""
            for start in range(0, n, BLOCK_RECORDS):
                stop = min(start + BLOCK_RECORDS, n)
                cols = {k: np.asarray(v[start:stop]) for k, v in features.items()}
                keep = np.ones(stop - start, dtype=bool)
                for name, values in cols.items():
                    if values.dtype.kind == "f" and values.dtype != np.float32:
                        cols[name] = values = values.astype(np.float32)
                    nan, inf = bad_float_rows(values)
                    for mask, why in ((nan, "NaN is not allowed"), (inf, "±inf is not allowed")):
                        for i in np.flatnonzero(mask & keep):
                            rejects.add(str(path), start + int(i), why, name)
                        keep &= ~mask
                if label:
                    cols["y"] = label_array(np.asarray(arrays[label][start:stop]), kind, encoder)
                if len(features) == 1:
                    only = next(iter(features))
                    cols["x"] = cols.pop(only)
                if not keep.all():
                    cols = {k: v[keep] for k, v in cols.items()}
                yield Block(cols, done + int(path.stat().st_size * stop / max(n, 1)))
            done += path.stat().st_size


class NpySource(_ArraySource):
    format = "npy"

    def _arrays(self) -> list[tuple[Path, dict[str, np.ndarray]]]:
        if self.label:
            raise BadRequest("an .npy file holds one array (the features): use .npz for features and labels")
        out = []
        for path in self.paths:
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise BadRequest(f"{path}: not a NumPy array file ({exc})") from None
            if array.ndim == 0 or array.dtype.kind not in "iufb":
                raise BadRequest(f"{path}: expected a numeric array of records, got {array.dtype} {array.shape}")
            out.append((path, {"x": array}))
        self.features = ["x"]
        return out


class NpzSource(_ArraySource):
    format = "npz"

    def _arrays(self) -> list[tuple[Path, dict[str, np.ndarray]]]:
        out = []
        for path in self.paths:
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            except (ValueError, OSError) as exc:
                raise BadRequest(f"{path}: not a NumPy .npz archive ({exc})") from None
            if not arrays:
                raise BadRequest(f"{path}: the archive holds no arrays")
            lengths = {k: len(v) for k, v in arrays.items() if v.ndim}
            if len(set(lengths.values())) != 1 or len(lengths) != len(arrays):
                raise BadRequest(f"{path}: arrays must share their first dimension (got {lengths})")
            if self.label is None:
                self.label = next((k for k in _LABEL_NAMES if k in arrays), None)
            elif self.label not in arrays:
                raise BadRequest(f"{path}: no array {self.label!r} (arrays: {', '.join(arrays)})")
            for name, values in arrays.items():
                if name != self.label and values.dtype.kind not in "iufb":
                    raise BadRequest(f"{path}: array {name!r} is {values.dtype}, not numeric")
            out.append((path, arrays))
        self.features = [k for k in out[0][1] if k != self.label]
        return out
