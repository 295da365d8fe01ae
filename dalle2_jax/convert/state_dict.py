"""PyTorch-style state dicts read one tensor at a time, so importing a model never holds a whole
weight file in host memory beside its converted copy.

  state, file = read_weights(directory, ("diffusion_pytorch_model.safetensors",), ("diffusion_pytorch_model.bin",))
  state["conv_in.weight"]          # read from the file now: a NumPy array in the file's dtype

safetensors files are parsed here (an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the data) and each tensor is read with a plain file
read: no memory map, whose pages would count as this process's memory for as long as the file is
open. Sharded checkpoints (`*.safetensors.index.json`) read from the shard that holds the key.
PyTorch pickles (`*.bin`) need torch, and are opened with `torch.load(weights_only=True,
mmap=True)` so their tensors too are copied out one at a time. A damaged file raises a
ValueError naming it.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER_BYTES = 100 * 2**20


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class SafetensorsFile(Mapping):
    """The tensors of one .safetensors file; the header is read and checked on construction."""

    def __init__(self, file):
        self.file = Path(file)
        try:
            size = self.file.stat().st_size
            with open(self.file, "rb") as stream:
                prefix = stream.read(8)
                if len(prefix) < 8:
                    raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
                (header_bytes,) = struct.unpack("<Q", prefix)
                if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
                    raise ValueError(f"a header of {header_bytes} bytes in a file of {size}")
                header = json.loads(stream.read(header_bytes).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            self._data_start = 8 + header_bytes
            self._entries = {name: self._check_entry(name, entry, size - self._data_start)
                             for name, entry in header.items() if name != "__metadata__"}
        except (ValueError, UnicodeDecodeError, OSError) as error:
            raise ValueError(f"path: {self.file} is corrupt or not a safetensors file ({error})") from None

    @staticmethod
    def _check_entry(name: str, entry, data_bytes: int) -> tuple[np.dtype, tuple[int, ...], int]:
        try:
            dtype = _numpy_dtype(_DTYPES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed header entry {entry!r}") from None
        if not 0 <= begin <= end <= data_bytes or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} ({entry['dtype']} {list(shape)}) has data_offsets {[begin, end]} "
                             f"that do not fit its size or the file's {data_bytes} data bytes")
        return dtype, shape, begin

    def __getitem__(self, key: str) -> np.ndarray:
        dtype, shape, begin = self._entries[key]
        count = int(np.prod(shape))
        with open(self.file, "rb") as stream:
            stream.seek(self._data_start + begin)
            array = np.fromfile(stream, dtype=dtype, count=count)  # safetensors is little-endian, as are our hosts
        if array.size != count:
            raise ValueError(f"path: {self.file} is corrupt (tensor {key!r} is cut short)")
        return array.reshape(shape)

    def __contains__(self, key) -> bool:  # Mapping's default would read the tensor
        return key in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class TorchFile(Mapping):
    """The tensors of a PyTorch state-dict pickle, as NumPy (bfloat16 becomes float32)."""

    def __init__(self, file):
        self.file = Path(file)
        try:
            import torch
        except ImportError:
            raise ValueError(f"path: {self.file} is a PyTorch pickle, which needs torch to read; install torch "
                             "(CPU is enough) or convert the directory to safetensors") from None
        self._torch = torch
        try:
            try:
                self._state = torch.load(self.file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
                self._state = torch.load(self.file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"path: {self.file} is corrupt or not a torch state dict ({type(error).__name__}: "
                             f"{error})") from None
        if not isinstance(self._state, Mapping):
            raise ValueError(f"path: {self.file} holds a {type(self._state).__name__}, expected a state dict")

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._state[key].detach()
        if value.dtype == self._torch.bfloat16:
            value = value.float()
        return value.numpy().copy()  # a copy, not a view of the mapped file

    def __contains__(self, key) -> bool:
        return key in self._state

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def read_weights(directory, safetensors_names: Sequence[str], torch_names: Sequence[str]) -> tuple[Mapping, str]:
    """(state dict read on access, the file it reads) of a checkpoint directory: the first of
    `safetensors_names` present, else its sharded `.index.json`, else the first of `torch_names`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"path: no component directory {directory}")
    for name in safetensors_names:
        if (directory / name).is_file():
            return SafetensorsFile(directory / name), str(directory / name)
        index = directory / (name + ".index.json")
        if index.is_file():
            return _sharded(directory, index), str(index)
    for name in torch_names:
        if (directory / name).is_file():
            return TorchFile(directory / name), str(directory / name)
    raise FileNotFoundError(f"path: {directory} has no weights (expected one of "
                            f"{tuple(safetensors_names) + tuple(torch_names)})")


def _sharded(directory: Path, index: Path) -> Mapping:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"path: {index} is corrupt (expected a JSON object with a weight_map: {error})") from None
    missing = [shard for shard in shards if not (directory / shard).is_file()]
    if missing:
        raise FileNotFoundError(f"path: {index} names shards that are not in {directory}: {missing}")
    return collections.ChainMap(*(SafetensorsFile(directory / shard) for shard in shards))


@functools.partial(jax.jit, static_argnames=("axes", "dtype"))
def _relayout(array, axes, dtype):
    return jnp.transpose(array, axes).astype(dtype)


def to_device(value, dtype=None, axes=None) -> jax.Array:
    """`value` (NumPy or jax) as a jax array of `dtype` (default: its own), its axes permuted to
    `axes` (default: as they are). The permutation and the cast run on the device, where they
    are several times faster than NumPy's strided copies and make no second host copy."""
    array = value if isinstance(value, jax.Array) else jax.device_put(np.asarray(value, order="C"))
    dtype = array.dtype if dtype is None else jnp.dtype(dtype)
    if axes is None and array.dtype == dtype:
        return array
    return _relayout(array, tuple(range(array.ndim)) if axes is None else tuple(axes), dtype)


def release_free_host_memory() -> None:
    """Hand the heap memory that malloc keeps after frees back to the OS (glibc's malloc_trim;
    a no-op elsewhere). Converting a model frees a transient copy of every tensor between the
    arrays that stay, and glibc would otherwise keep those holes as this process's memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
