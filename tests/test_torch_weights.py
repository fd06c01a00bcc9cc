"""imgcap.vision.torch_weights: torch's legacy state-dict format read into numpy, and nothing else unpickled."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from imgcap.vision import torch_weights

# ----------------------------------------------------------------------------------------------------------------
# A torch legacy-format file written with the stdlib only (opcodes spelled out: torch's globals cannot be pickled
# without torch installed), laid out as torch.save(..., _use_new_zipfile_serialization=False) does.
# ----------------------------------------------------------------------------------------------------------------

def _op_str(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _op_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _op_tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _tensor_record(storage_type: str, key: str, numel: int, offset: int, size: tuple[int, ...],
                   stride: tuple[int, ...]) -> bytes:
    """torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())."""
    persistent_id = _op_tuple([_op_str("storage"), _op_global("torch", storage_type), _op_str(key), _op_str("cpu"),
                               _op_int(numel), pickle.NONE]) + pickle.BINPERSID
    args = _op_tuple([persistent_id, _op_int(offset), _op_tuple([_op_int(n) for n in size]),
                      _op_tuple([_op_int(s) for s in stride]), pickle.NEWFALSE,
                      _op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE])
    return _op_global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def _state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    items = b"".join(_op_str(name) + record for name, record in entries.items())
    return (pickle.PROTO + b"\x02" + _op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.MARK + items + pickle.SETITEMS + pickle.STOP)


def _legacy_file(path: Path, main_pickle: bytes, storages: dict[str, np.ndarray]) -> Path:
    header = b"".join(pickle.dumps(obj, protocol=2) for obj in (
        0x1950A86A20F9469CFC6C, 1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    keys = sorted(storages)  # torch writes the storages in sorted-key order (as strings: "10" < "9")
    body = b"".join(struct.pack("<q", storages[k].size) + storages[k].astype(storages[k].dtype.newbyteorder("<"))
                    .tobytes() for k in keys)
    path.write_bytes(header + main_pickle + pickle.dumps(keys, protocol=2) + body)
    return path


def test_reads_a_legacy_file_honouring_offsets_and_strides(tmp_path):
    floats = np.arange(12, dtype=np.float32) * 1.5
    pickled = _state_dict_pickle({
        "conv.weight": _tensor_record("FloatStorage", "10", 12, 2, (2, 3), (1, 2)),  # a transposed view, offset 2
        "conv.every_third": _tensor_record("FloatStorage", "10", 12, 0, (4,), (3,)),  # same storage, strided
        "bn.num_batches_tracked": _tensor_record("LongStorage", "9", 1, 0, (), ()),  # int64 scalar
    })
    path = _legacy_file(tmp_path / "tiny.pth", pickled, {"10": floats, "9": np.array([7], dtype=np.int64)})

    state = torch_weights.read_legacy_state_dict(path)

    assert list(state) == ["conv.weight", "conv.every_third", "bn.num_batches_tracked"]
    expected = np.array([[floats[2 + i + 2 * j] for j in range(3)] for i in range(2)], dtype=np.float32)
    np.testing.assert_array_equal(state["conv.weight"], expected)
    np.testing.assert_array_equal(state["conv.every_third"], floats[[0, 3, 6, 9]])
    assert state["bn.num_batches_tracked"].shape == () and state["bn.num_batches_tracked"].dtype == np.int64
    assert int(state["bn.num_batches_tracked"]) == 7
    for array in state.values():  # copies: own memory, writable, C order
        assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata


def test_refuses_malicious_pickles_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    shell = pickle.PROTO + b"\x02" + _op_global("os", "system") + _op_tuple([_op_str(f"touch {marker}")]) \
        + pickle.REDUCE + pickle.STOP
    # A bare malicious pickle (the reader's first pickle is the magic number).
    (tmp_path / "bare.pth").write_bytes(shell)
    with pytest.raises(torch_weights.TorchWeightsError, match=r"refusing to unpickle global os\.system"):
        torch_weights.read_legacy_state_dict(tmp_path / "bare.pth")
    # Valid legacy headers, then a state dict whose value is builtins.eval(...).
    evil = pickle.PROTO + b"\x02" + _op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE \
        + pickle.MARK + _op_str("w") + _op_global("builtins", "eval") \
        + _op_tuple([_op_str(f"open({str(marker)!r}, 'w')")]) + pickle.REDUCE + pickle.SETITEMS + pickle.STOP
    with pytest.raises(torch_weights.TorchWeightsError, match=r"refusing to unpickle global builtins\.eval"):
        torch_weights.read_legacy_state_dict(_legacy_file(tmp_path / "evil.pth", evil, {}))
    assert not marker.exists()
    # A dtype without a numpy equivalent is refused by name too.
    bf16 = _state_dict_pickle({"w": _tensor_record("BFloat16Storage", "0", 1, 0, (1,), (1,))})
    with pytest.raises(torch_weights.TorchWeightsError, match=r"torch\.BFloat16Storage \(unsupported tensor dtype\)"):
        torch_weights.read_legacy_state_dict(_legacy_file(tmp_path / "bf16.pth", bf16, {"0": np.zeros(1, np.float32)}))


def test_refuses_truncated_files_and_out_of_range_views(tmp_path):
    ok = _state_dict_pickle({"w": _tensor_record("FloatStorage", "0", 4, 0, (4,), (1,))})
    path = _legacy_file(tmp_path / "ok.pth", ok, {"0": np.ones(4, np.float32)})
    (tmp_path / "short.pth").write_bytes(path.read_bytes()[:-3])
    with pytest.raises(torch_weights.TorchWeightsError, match="truncated"):
        torch_weights.read_legacy_state_dict(tmp_path / "short.pth")
    beyond = _state_dict_pickle({"w": _tensor_record("FloatStorage", "0", 4, 2, (2, 2), (2, 1))})
    with pytest.raises(torch_weights.TorchWeightsError, match="beyond its storage"):
        torch_weights.read_legacy_state_dict(_legacy_file(tmp_path / "beyond.pth", beyond, {"0": np.ones(4, np.float32)}))


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------
