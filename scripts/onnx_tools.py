"""Torch-free building blocks for model converters.

* :func:`load_state_dict` reads PyTorch checkpoints (``.pth``/``.pt``, both the
  zip format of torch >= 1.6 and the older "legacy" pickle stream) and
  ``.safetensors`` files into ``{name: numpy array}`` without importing torch.
  Pickles are read with an unpickler that can only build tensors, so loading
  an untrusted checkpoint cannot run code.
* :class:`GraphBuilder` writes inference graphs (opset 17) with BatchNorm
  folded into the preceding convolution.
"""
from __future__ import annotations

import collections
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version released with opset 17; onnxruntime >= 1.11 reads it

# Storage classes / safetensors dtype codes -> little-endian numpy dtype (bfloat16 unsupported).
_TORCH_STORAGES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "DoubleStorage": "<f8",
                   "LongStorage": "<i8", "IntStorage": "<i4"}
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _TensorRef(NamedTuple):
    """A tensor as pickled: a strided view of storage ``key``, read once all storages are."""
    key: str
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor(storage_key, offset, shape, stride, *_ignored):
    return _TensorRef(storage_key, offset, tuple(shape), tuple(stride))


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda tensor, *_ignored: tensor,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only dicts, OrderedDicts and tensor references; refuses every other global."""

    def __init__(self, file):
        super().__init__(file)
        self.storage_dtypes: dict[str, str] = {}

    def find_class(self, module, name):
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which is not allowed")

    def persistent_load(self, pid):
        # ("storage", dtype, key, location, numel[, view_metadata (legacy format only)])
        if pid[0] != "storage" or pid[1] not in _TORCH_STORAGES.values():
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[:2]!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        self.storage_dtypes[str(pid[2])] = pid[1]
        return str(pid[2])


def _materialize(obj, storages: dict[str, np.ndarray]):
    """Replace the tensor references in ``obj`` (dicts nest) by owned numpy arrays."""
    if isinstance(obj, dict):
        return {k: _materialize(v, storages) for k, v in obj.items()}
    if not isinstance(obj, _TensorRef):
        return obj
    flat = storages[obj.key]
    last = obj.offset + sum((n - 1) * s for n, s in zip(obj.shape, obj.stride))
    if 0 not in obj.shape and not 0 <= obj.offset <= last < flat.size:
        raise ValueError(f"tensor view outside its storage {obj.key}")
    view = np.lib.stride_tricks.as_strided(
        flat[obj.offset:], obj.shape, [s * flat.itemsize for s in obj.stride])
    return np.array(view)


def _load_zip_checkpoint(path: Path):
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder") != b"little":
            raise ValueError("big-endian checkpoints are not supported")
        with zf.open(pkl) as f:
            unpickler = _RestrictedUnpickler(f)
            obj = unpickler.load()
        storages = {key: np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype)
                    for key, dtype in unpickler.storage_dtypes.items()}
    return _materialize(obj, storages)


def _load_legacy_checkpoint(path: Path):
    """Pre-1.6 format: magic, version, sys_info, object and key-list pickles, then raw storages."""
    with open(path, "rb") as f:
        if _RestrictedUnpickler(f).load() != _LEGACY_MAGIC:
            raise ValueError(f"{path} is neither a zip nor a legacy PyTorch checkpoint")
        _RestrictedUnpickler(f).load()  # protocol version
        if not _RestrictedUnpickler(f).load().get("little_endian", True):
            raise ValueError("big-endian checkpoints are not supported")
        unpickler = _RestrictedUnpickler(f)
        obj = unpickler.load()
        storages = {}
        for key in _RestrictedUnpickler(f).load():
            dtype = unpickler.storage_dtypes[key]
            (numel,) = struct.unpack("<q", f.read(8))
            storages[key] = np.frombuffer(f.read(numel * np.dtype(dtype).itemsize), dtype)
    return _materialize(obj, storages)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"{path}: corrupt safetensors header")
    header = json.loads(data[8:8 + header_len])
    body = memoryview(data)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        flat = np.frombuffer(body[begin:end], _SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"]).copy()
    return tensors


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a ``.pth``/``.pt``/``.safetensors`` checkpoint into ``{name: array}``.

    A checkpoint that wraps its weights as ``{"state_dict": ...}`` or
    ``{"model": ...}`` is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    obj = _load_zip_checkpoint(path) if zipfile.is_zipfile(path) else _load_legacy_checkpoint(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise TypeError(f"{path}: entries are not tensors: {bad[:5]}")
    return obj


def bn_params(state: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, ...]:
    """(gamma, beta, running_mean, running_var) of the ``torch.nn.BatchNorm2d`` at ``prefix``."""
    return tuple(state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))


def _pad_attrs(pads) -> dict:
    """``"same"``: TF-style SAME (extra pixel bottom/right), computed at run time for any size;
    an int ``p``: symmetric explicit padding."""
    return {"auto_pad": "SAME_UPPER"} if pads == "same" else {"pads": [pads] * 4}


class GraphBuilder:
    """Accumulates nodes and initializers; each op helper returns its output tensor's name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _claim(self, name: str) -> str:
        """``name`` itself if unused, else ``name_1``, ``name_2``, ..."""
        unique, i = name, 0
        while unique in self._names:
            i += 1
            unique = f"{name}_{i}"
        self._names.add(unique)
        return unique

    def initializer(self, name: str, array: np.ndarray) -> str:
        name = self._claim(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        """Append ``op``; its output is named ``out`` (made unique) or after the op."""
        out = self._claim(out or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(self, x: str, weight: np.ndarray, bn: tuple, *, eps: float, stride: int = 1,
                groups: int = 1, pads="same", name: str = "conv") -> str:
        """Conv (no bias) followed by inference BatchNorm ``bn`` (see :func:`bn_params`),
        folded into one Conv in float64 before casting to float32."""
        gamma, beta, mean, var = (np.asarray(a, np.float64) for a in bn)
        scale = gamma / np.sqrt(var + eps)
        folded = weight * scale[:, None, None, None]
        w = self.initializer(f"{name}.weight", folded.astype(np.float32))
        b = self.initializer(f"{name}.bias", (beta - mean * scale).astype(np.float32))
        return self.node("Conv", [x, w, b], name, kernel_shape=list(weight.shape[2:]),
                         strides=[stride, stride], group=groups, **_pad_attrs(pads))

    def relu6(self, x: str, out: str | None = None) -> str:
        """Clip to [0, 6]; the bound constants are shared by every call."""
        if "relu6.min" not in self._names:
            self.initializer("relu6.min", np.array(0, np.float32))
            self.initializer("relu6.max", np.array(6, np.float32))
        return self.node("Clip", [x, "relu6.min", "relu6.max"], out or "relu6")

    def relu(self, x: str, out: str | None = None) -> str:
        return self.node("Relu", [x], out)

    def add(self, a: str, b: str, out: str | None = None) -> str:
        return self.node("Add", [a, b], out)

    def max_pool(self, x: str, kernel: int, stride: int, pads="same",
                 out: str | None = None) -> str:
        return self.node("MaxPool", [x], out, kernel_shape=[kernel, kernel],
                         strides=[stride, stride], **_pad_attrs(pads))

    def global_average_pool(self, x: str, out: str | None = None) -> str:
        return self.node("GlobalAveragePool", [x], out)

    def flatten(self, x: str, out: str | None = None) -> str:
        """[N, C, 1, 1] -> [N, C]."""
        return self.node("Flatten", [x], out, axis=1)

    def finalize(self, inputs: dict[str, list], outputs: dict[str, list], name: str,
                 doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """Float32 model with the given ``{tensor: shape}`` inputs/outputs (a str dim is
        symbolic, i.e. dynamic), checked with ``onnx.checker``."""
        def value_infos(spec):
            return [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in spec.items()]

        graph = helper.make_graph(self.nodes, name, value_infos(inputs), value_infos(outputs),
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="imgsim", doc_string=doc)
        helper.set_model_props(model, metadata or {})
        onnx.checker.check_model(model, full_check=True)
        return model


def save(model: onnx.ModelProto, path) -> None:
    """Write ``model`` as a single file (weights inline), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
