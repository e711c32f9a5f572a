"""Reading and writing safetensors files one tensor (or one slice) at a time.

The reader memory-maps each tensor with NumPy straight from the file (the safetensors layout
is an 8-byte little-endian header length, a JSON header of dtype/shape/byte offsets, then the
raw little-endian data), so slicing a tensor reads only the pages of that slice, and bfloat16
works through `ml_dtypes` (the `safetensors` NumPy backend has no bfloat16). Nothing in a file
is ever executed: the header is JSON and the data is raw numbers.

The writer streams: it writes the header from the tensors' shapes and dtypes, then asks for
each tensor's data in turn, so only one tensor is on the host at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from rlhf_jax.errors import GinConfigError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointFileError(GinConfigError):
    """A checkpoint file or folder is missing, unreadable, inconsistent or unsupported (a user
    error: exit code 2 in the CLI)."""


class SafetensorsFile:
    """One .safetensors file: its header, and tensors as read-only memory maps.

    Attributes:
      path: the file.
      entries: tensor name -> {"dtype", "shape", "data_offsets"} from the header.
      metadata: the header's `__metadata__` (string -> string).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > _MAX_HEADER:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
            size = self.path.stat().st_size
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointFileError(f"cannot read safetensors file {self.path}: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._base = 8 + n
        for name, e in self.entries.items():
            start, end = e["data_offsets"]
            if e["dtype"] not in DTYPES:
                raise CheckpointFileError(f"{self.path}: tensor {name} has dtype {e['dtype']}")
            nbytes = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - start != nbytes or self._base + end > size:
                raise CheckpointFileError(f"{self.path}: tensor {name} has inconsistent offsets")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (no data is read until it is sliced)."""
        e = self.entries[name]
        shape = tuple(e["shape"])
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, DTYPES[e["dtype"]])
        return np.memmap(
            self.path,
            dtype=DTYPES[e["dtype"]],
            mode="r",
            offset=self._base + e["data_offsets"][0],
            shape=shape,
        )


def dtype_name(dtype) -> str:
    """The safetensors dtype string of a NumPy/ml_dtypes dtype."""
    d = np.dtype(dtype)
    if d not in _NAMES:
        raise ValueError(f"dtype {d} cannot be written to safetensors")
    return _NAMES[d]


def write_streaming(
    path: str | os.PathLike,
    specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a safetensors file whose tensors are produced one at a time.

    Args:
      path: the output file (written in place; callers write into a temporary folder).
      specs: (name, shape, dtype) of each tensor, in file order.
      produce: called once per name, in order; must return an array of that shape and dtype.
      metadata: the header's `__metadata__` (e.g. {"format": "pt"}, which `transformers` wants).
    """
    header: dict[str, dict] = {}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data start stays 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: produced {arr.shape} {arr.dtype}, want {shape} {dtype}")
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
