"""Read tensors, or slices of them, from one network of our dist checkpoints, in one process.

A Megatron-Core ``torch_dist`` checkpoint is a PyTorch Distributed Checkpoint: every
weight is stored under its *global* (unsharded) key and shape -- transformer layers
stacked on a leading axis (``decoder.layers.mlp.linear_fc1.weight`` is ``[L, 2F, H]``) --
as chunks written by the ranks of whatever TP/PP layout saved it. Reading the global
tensor therefore undoes any layout. ``megatron.core.dist_checkpointing.load`` can do that
only for whole tensors in one process (a partial read assumes other ranks read the rest),
so this module plans the reads itself and hands them to torch's ``FileSystemReader``, the
same reader Megatron uses: :meth:`DistCheckpointReader.read` returns one layer of a
stacked tensor while touching only the chunks that hold it. Memory: the slice plus one
stored chunk at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem


class _IntoTensor:
    """The two planner calls ``FileSystemReader.read_data`` makes, writing into ``out``."""

    def __init__(self, out: torch.Tensor, offsets: Sequence[int]):
        self.out = out
        self.offsets = offsets

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        view = self.out
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item, value) -> None:  # pragma: no cover - tensors only
        raise RuntimeError(f"unexpected byte item {item.storage_index}")


class DistCheckpointReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = FileSystemReader(str(self.path))
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, True)
        self.tensors: Dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        """The global tensor ``key``, or its slice ``[index]`` along the first axis."""
        meta = self.tensors[key]
        size = list(meta.size)
        offsets = [0] * len(size)
        if index is not None:
            offsets[0], size[0] = index, 1
        out = torch.empty(size, dtype=meta.properties.dtype)
        items = []
        covered = 0
        for chunk in meta.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, size, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            lengths = [h - l for l, h in zip(lo, hi)]
            covered += int(torch.tensor(lengths).prod()) if lengths else 1
            items.append(
                ReadItem(
                    type=LoadItemType.TENSOR,
                    dest_index=MetadataIndex(key, torch.Size(offsets)),
                    dest_offsets=torch.Size([l - o for l, o in zip(lo, offsets)]),
                    storage_index=MetadataIndex(key, chunk.offsets),
                    storage_offsets=torch.Size([l - c for l, c in zip(lo, chunk.offsets)]),
                    lengths=torch.Size(lengths),
                )
            )
        if covered != out.numel():
            raise RuntimeError(f"{self.path}: the stored chunks of {key} cover {covered} of {out.numel()} elements (partial checkpoint?)")
        self._reader.read_data(LoadPlan(items), _IntoTensor(out, offsets)).wait()
        return out[0] if index is not None else out
