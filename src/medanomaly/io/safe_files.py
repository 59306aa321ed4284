"""Model and checkpoint files that cannot run code when they are loaded.

A saved detector or training checkpoint is one `safetensors
<https://huggingface.co/docs/safetensors>`_ file: every tensor and array lives in the
file's tensor table, and everything else (constructor arguments, threshold, history, config)
is JSON in the file's header. Reading it parses JSON and copies bytes; nothing is unpickled.

Files written by medanomaly before 0.2 (``model.pt``, ``checkpoint.pt``) are pickles, which
can run any code when loaded. They load only when the user says they trust them:
``--trust-pickle`` on the command line, ``MEDANOMALY_TRUST_PICKLE=1`` in the environment, or
``trust_pickle=True`` in Python.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from medanomaly.errors import MedanomalyError
from medanomaly.io.atomic import atomic_write

log = logging.getLogger(__name__)

METADATA_KEY = "medanomaly"
TRUST_PICKLE_ENV = "MEDANOMALY_TRUST_PICKLE"
_HEADER_LIMIT = 100 * 2**20  # a safetensors header larger than this is not ours


class UnsafeFileError(MedanomalyError):
    """A file to load is not a medanomaly safetensors file and pickles were not trusted."""


def trust_pickle_default() -> bool:
    """True when ``MEDANOMALY_TRUST_PICKLE`` is set to 1, true or yes."""
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in {"1", "true", "yes"}


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (nested dicts, lists, tuples, numbers, strings, tensors, arrays).

    Args:
        state: What to save; tensors and NumPy arrays go to the tensor table, the rest to JSON.
        path: The file to write, atomically.

    Raises:
        TypeError: ``state`` holds a value that is neither plain data, a tensor nor an array.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    data = save_tensors(tensors, metadata={METADATA_KEY: json.dumps(tree)})
    atomic_write(path, lambda handle: handle.write(data), mode="wb")


def is_safe_file(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file with medanomaly's metadata."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return False
            (size,) = struct.unpack("<Q", prefix)
            if size > _HEADER_LIMIT:
                return False
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and METADATA_KEY in header.get("__metadata__", {})


def load_state(path: str | Path, trust_pickle: bool | None = None) -> dict[str, Any]:
    """Read a file written by :func:`save_state`; a legacy pickle only when trusted.

    Args:
        path: The model or checkpoint file.
        trust_pickle: Load a pickle (``torch.save``) file, which can run code; ``None`` reads
            ``MEDANOMALY_TRUST_PICKLE``.

    Raises:
        UnsafeFileError: ``path`` is not a medanomaly safetensors file and pickles are not
            trusted (the file is not opened as a pickle).
    """
    path = Path(path)
    if is_safe_file(path):
        data = path.read_bytes()
        header_size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_size])
        tensors = load_tensors(data)
        return _decode(json.loads(header["__metadata__"][METADATA_KEY]), tensors)
    if trust_pickle is None:
        trust_pickle = trust_pickle_default()
    if not trust_pickle:
        raise UnsafeFileError(
            f"{path}: not a medanomaly safetensors file, refused. If it is a model.pt or "
            "checkpoint.pt written by medanomaly before 0.2 it is a pickle, which can run any "
            "code when loaded: load it only if you trust where it came from, with "
            f"--trust-pickle or {TRUST_PICKLE_ENV}=1 (see docs/safe_files.md)"
        )
    log.warning("%s: loading a pickle because it was trusted (--trust-pickle)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-ready data; tensors and arrays go into ``tensors`` by reference."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _put(tensors, value.detach().cpu().clone().contiguous())}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return {"__strings__": value.tolist()}
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cannot save an array of dtype {value.dtype}")
        return {"__array__": _put(tensors, torch.from_numpy(np.array(value, copy=True)))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in a model file")


def _put(tensors: dict[str, torch.Tensor], tensor: torch.Tensor) -> str:
    name = f"t{len(tensors)}"
    tensors[name] = tensor
    return name


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__array__" in value:
        return tensors[value["__array__"]].numpy()
    if "__strings__" in value:
        return np.asarray(value["__strings__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
