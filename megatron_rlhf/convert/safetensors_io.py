"""Stream safetensors files tensor by tensor, in both directions.

``safetensors.torch.save_file`` wants every tensor of a file in memory at once and then
copies each one into a bytes object; ``safe_open`` memory-maps the file, and every page
it touches counts as resident memory until the file is closed. Conversion only needs the
simple format (``u64`` header length, JSON header with dtype / shape / byte range per
tensor, raw little-endian data), so:

* :class:`SafetensorsWriter` writes the header from the declared names and shapes, then
  each tensor's bytes as it is produced;
* :class:`SafetensorsIndex` reads the headers of a checkpoint (one file or sharded with
  ``model.safetensors.index.json``) and :meth:`~SafetensorsIndex.read` copies one tensor
  straight from the file into a fresh tensor.

Files written here load with ``safetensors`` and ``transformers``; the tests check it.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("safetensors streaming assumes a little-endian machine")

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
FROM_CODE = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsError(RuntimeError):
    pass


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write one file: the header for ``entries`` [(name, shape, dtype)] first, then
    :meth:`write` each tensor in that order."""

    def __init__(self, path: Path, entries: Sequence[Tuple[str, Sequence[int], torch.dtype]], metadata: Optional[dict] = None):
        self.path = Path(path)
        header: Dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: List[Tuple[str, tuple, torch.dtype]] = []
        for name, shape, dtype in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
            self._order.append((name, tuple(int(s) for s in shape), dtype))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0
        self.total_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self._order[self._next]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise SafetensorsError(f"{self.path}: expected {want_name} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._fh.write(_as_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        done = self._next == len(self._order)
        self._fh.close()
        if not done:
            raise SafetensorsError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written")


class SafetensorsIndex:
    """Where every tensor of a Hugging Face checkpoint folder lives."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise SafetensorsError(
                    f"{folder} is incomplete: {INDEX_NAME} lists {len(files)} shard(s) but "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                    f"{'is' if len(missing) == 1 else 'are'} missing (an interrupted download?)"
                )
        elif (folder / SINGLE_NAME).is_file():
            files, weight_map = [SINGLE_NAME], None
        else:
            others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = (
                f" It has {', '.join(others[:3])}: only safetensors are read; re-save it with "
                f"model.save_pretrained(dir, safe_serialization=True)."
                if others else ""
            )
            raise SafetensorsError(f"no {SINGLE_NAME} or {INDEX_NAME} in {folder}.{hint}")
        self.entries: Dict[str, Tuple[Path, torch.dtype, Tuple[int, ...], int, int]] = {}
        for name in files:
            path = folder / name
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{path} is truncated (no header)")
                (length,) = struct.unpack("<Q", head)
                try:
                    header = json.loads(fh.read(length))
                except ValueError:
                    raise SafetensorsError(f"{path} is not a safetensors file (bad header)") from None
            start = 8 + length
            size = path.stat().st_size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in FROM_CODE:
                    raise SafetensorsError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                if start + end > size:
                    raise SafetensorsError(f"{path} is truncated: {key} ends at byte {start + end} of {size}")
                self.entries[key] = (path, FROM_CODE[info["dtype"]], tuple(info["shape"]), start + begin, end - begin)
        if weight_map is not None:
            lost = [k for k, f in weight_map.items() if k not in self.entries]
            if lost:
                raise SafetensorsError(f"{folder}: {INDEX_NAME} names tensors missing from their shards: {lost[:5]}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> List[str]:
        return list(self.entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, length = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        if length:
            with open(path, "rb") as fh:
                fh.seek(offset)
                got = fh.readinto(_as_bytes(out))
            if got != length:
                raise SafetensorsError(f"{path}: short read of {name} ({got} of {length} bytes)")
        return out


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1GiB' / a plain number of bytes."""
    t = str(text).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)
