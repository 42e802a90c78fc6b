"""Reading safetensors checkpoints (one file or sharded) one tensor at a time, without keeping the file resident.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``name -> {dtype, shape, data_offsets}``, offsets relative to the end of the header), then the raw little-endian data.

Memory: each yielded tensor is a zero-copy view of a private memory map of the file. Once the consumer asks for the
next tensor, the pages of the previous one are dropped from this process (``MADV_DONTNEED``), so the resident set
grows by at most one tensor (plus a page on either side) while a whole checkpoint streams through, instead of by the
size of the file as it does while a ``safetensors.safe_open`` handle stays open. A view that the consumer kept stays
valid: its pages are read back from the file when touched again. Views must be treated as read-only (a write would
be lost when the pages are dropped).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from airun.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the format's own reference limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(slots=True, frozen=True)
class TensorEntry:
    """One tensor of a safetensors file. ``start``/``end`` are absolute byte offsets in the file and
    ``end - start == prod(shape) * itemsize(dtype)``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in file order. Raises ModelLoadError if the file is not a valid
    safetensors file (bad header, unknown dtype, offsets outside the file or inconsistent with the shape)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelLoadError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(raw, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ModelLoadError(f"{path} is not a valid safetensors file (header length {n} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not a valid safetensors file (its header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file (header is not a JSON object)")
    base = 8 + n
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: malformed header entry for tensor {name!r}") from e
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes or base + end > size:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has data offsets {begin}..{end} that do not fit its shape {list(shape)} "
                f"({dtype_name}) or the file size (the file may be truncated)"
            )
        entries.append(TensorEntry(name, dtype, shape, base + begin, base + end))
    entries.sort(key=lambda e: e.start)
    return entries


def _drop_pages(mm: mmap.mmap, start: int, end: int) -> None:
    """Releases this process's pages of ``mm[start:end]``; their content stays readable (re-read from the file)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or end <= start:
        return
    lo = start - start % mmap.PAGESIZE
    mm.madvise(advice, lo, min(end, len(mm)) - lo)


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` for every tensor of one file, in file order. Each tensor is a read-only view of the
    file (see the module docstring); its pages are released when the next tensor is requested."""
    entries = read_header(path)
    if not entries:
        return
    with open(path, "rb") as f:
        # ACCESS_COPY (a private mapping) gives a writable buffer, so torch.frombuffer needs no read-only escape hatch;
        # nothing ever writes to it. The mapping lives until the last tensor viewing it is freed (torch holds a
        # reference to the mmap object), so it is never closed here.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for e in entries:
        numel = math.prod(e.shape)
        if numel == 0:
            tensor = torch.empty(e.shape, dtype=e.dtype)
        else:
            tensor = torch.frombuffer(mm, dtype=e.dtype, count=numel, offset=e.start).view(e.shape)
        yield e.name, tensor
        del tensor
        _drop_pages(mm, e.start, e.end)


def is_consolidated(p: Path) -> bool:
    """Mistral's own-format ``consolidated*.safetensors`` (non-HF tensor names) shipped beside HF shards."""
    return p.name.startswith("consolidated")


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint folder, in load order: the shards named by
    ``model.safetensors.index.json`` when it exists, else every ``*.safetensors`` file (Mistral ``consolidated``
    files are never read). Raises ModelLoadError when a listed shard is missing or only consolidated files exist."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        names = sorted(set(weight_map.values()))
        files = [folder / n for n in names]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    hf_named = [p for p in files if not is_consolidated(p)]
    if files and not hf_named:
        raise ModelLoadError(
            f"{folder} holds only Mistral-format consolidated*.safetensors (non-Hugging Face tensor names); "
            "use the Hugging Face-format checkpoint (model*.safetensors)"
        )
    return hf_named


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of all files, file by file, each file in its on-disk order (see :func:`iter_safetensors`)."""
    for path in files:
        yield from iter_safetensors(path)


def count_tensors(files: list[Path]) -> int:
    return sum(len(read_header(p)) for p in files)
