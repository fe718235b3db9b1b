"""The model file on disk: one safetensors file whose metadata holds a JSON manifest and a checksum.

safetensors stores tensors as raw bytes behind a JSON header (parsed without any code from the
file), so opening a model file cannot run anything. The checksum (SHA-256 over the manifest and
every tensor's name, dtype, shape and bytes) catches a truncated, corrupted or edited file; it is
not a signature: whoever can write the file can recompute it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from autoq.files import write_atomic

FORMAT = "autoq.model"
VERSION = 2
LEGACY_VERSION = 1  # a torch.save zip with the model pickled inside (loads only when trusted)
_KEY = "autoq"


class LegacyFile(ValueError):
    """The file is autoq's pickled format (version 1): opening it would run code from it."""


def write(path: str | os.PathLike, manifest: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `manifest` (JSON-serializable) and `tensors` to `path`, all at once or not at all."""
    manifest = {**manifest, "format": FORMAT, "version": VERSION}
    manifest["sha256"] = _checksum(manifest, tensors)
    # cloned: safetensors refuses tensors that share memory (tied weights, views)
    owned = {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}
    write_atomic(path, save(owned, metadata={_KEY: json.dumps(manifest)}))


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of a model file written by `write`; checks its format and checksum.

    Raises LegacyFile for a version-1 (pickled) file and ValueError for anything else that is not
    an intact autoq model file."""
    where = os.fspath(path)
    if not Path(where).is_file():
        raise ValueError(f"model file {where!r} not found.")
    if zipfile.is_zipfile(where):
        raise LegacyFile(where)
    try:
        with safe_open(where, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{where!r} is not an autoq model file ({error}).") from error
    try:
        manifest = json.loads(metadata[_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{where!r} is a safetensors file without an autoq manifest: not an autoq model "
                         f"file.") from error
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{where!r} has autoq model format {manifest.get('format')!r} version "
                         f"{manifest.get('version')}; this autoq reads version {VERSION}: load it with the "
                         f"autoq that wrote it ({manifest.get('versions', {}).get('autoq', '?')}).")
    stored = manifest.pop("sha256", None)
    if stored != _checksum(manifest, tensors):
        raise ValueError(f"{where!r} fails its checksum: the file was truncated, corrupted or edited after "
                         f"autoq wrote it. Save the model again.")
    return manifest, tensors


def _checksum(manifest: Mapping, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
