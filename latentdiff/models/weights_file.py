"""Read a safetensors file straight into tensors, one tensor at a time, with no second copy of the weights.

`safetensors.torch.load_file` maps the file into memory: the mapped pages count in the process's resident memory
as they are read, so a file loaded in another dtype (float32 weights as bfloat16) holds the mapped float32 file and
the bfloat16 copies at once (3x the loaded weights at the peak). Here a tensor already in the asked dtype stays
mapped (no copy: the fastest load, and the map is the weights), and a tensor to cast is read from the file into its
own memory (`readinto`, no map: the kernel's page cache is not the process's memory) and cast at once, so the peak
is the loaded weights plus the largest tensor in the file's dtype.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, the
offsets counted from its start.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (already checked by `validation.check_safetensors_file`), floating-point
    ones cast to `dtype` when given (those are read into their own CPU memory; the others stay mapped)."""
    tensors = {}
    with safe_open(str(path), framework="pt") as mapped, open(path, "rb", buffering=0) as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
        header.pop("__metadata__", None)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if entry["dtype"] not in DTYPES:
                raise ValueError(
                    f"{path}: tensor {name!r} has dtype {entry['dtype']}, which this reader lacks"
                )
            stored = DTYPES[entry["dtype"]]
            if dtype is None or stored == dtype or not stored.is_floating_point:
                tensors[name] = mapped.get_tensor(name)  # mapped as it is
                continue
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=stored)
            file.seek(8 + header_length + begin)
            _read_into(file, tensor.reshape(-1).view(torch.uint8).numpy(), end - begin, path)
            tensors[name] = tensor.to(dtype)
    return tensors


def _read_into(file, buffer, size: int, path: str | Path) -> None:
    """Fill `buffer` (`size` bytes) from the file's position; a read may return less than asked for."""
    if len(buffer) != size:
        raise ValueError(
            f"{path}: a tensor's data_offsets span {size} bytes but its shape needs {len(buffer)}"
        )
    view, done = memoryview(buffer), 0
    while done < size:
        count = file.readinto(view[done:])
        if not count:
            raise ValueError(f"{path} ends inside a tensor's data: the file is truncated; download it again")
        done += count
