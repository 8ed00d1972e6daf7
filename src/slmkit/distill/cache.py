"""A teacher's top-k log-probabilities cached on disk, made once and reused over epochs and runs.

A cache is a folder for one (teacher or mixture, temperature, k, training data, sequence length):

  cache.json   what it was made for (its key) and the array shapes
  index.npy    [N, T, k] token ids (uint16 when the vocabulary fits, else int32)
  logp.npy     [N, T, k] float32 log-probabilities of those tokens at the temperature
  rest.npy     [N, T]    float32 log of the mass outside them (the remainder bin, divergence.topk_bins)
  filled.npy   [N]       bool: which training sequences are written

Rows are filled when training first meets a sequence (the teacher runs then, and never again for it). The
arrays are memory-mapped .npy files (read without pickle); `filled.npy` is replaced atomically only after
the rows it marks are flushed, so a killed run leaves a cache whose marked rows are all complete. A cache
made for other data, another teacher, another temperature or k is refused, naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import SlmError, require

FORMAT = "slmkit-teacher-cache"
ARRAYS = ("index", "logp", "rest")


class TeacherCache:
    def __init__(self, folder: Path, meta: dict, arrays: dict[str, np.ndarray], filled: np.ndarray):
        self.folder, self.meta, self.arrays, self.filled = folder, meta, arrays, filled

    @property
    def k(self) -> int:
        return self.meta["k"]

    def lookup(self, index: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequences `index` [B], positions 0..width: (token ids [B, width, k] int64, log-probs [B, width, k],
        rest [B, width, 1])."""
        i = index.numpy()
        ids = torch.from_numpy(self.arrays["index"][i, :width].astype(np.int64))
        logp = torch.from_numpy(np.ascontiguousarray(self.arrays["logp"][i, :width]))
        rest = torch.from_numpy(np.ascontiguousarray(self.arrays["rest"][i, :width]))[..., None]
        return ids, logp, rest

    def missing(self, index: torch.Tensor) -> list[int]:
        """Positions in `index` whose sequence is not cached yet."""
        return [j for j, i in enumerate(index.tolist()) if not self.filled[i]]

    def store(self, index: list[int], ids: torch.Tensor, logp: torch.Tensor, rest: torch.Tensor) -> None:
        """Write whole sequences' rows (ids / logp [b, width, k], rest [b, width]) and mark them filled."""
        width = ids.shape[1]
        for j, i in enumerate(index):
            self.arrays["index"][i, :width] = ids[j].numpy()
            self.arrays["logp"][i, :width] = logp[j].float().numpy()
            self.arrays["rest"][i, :width] = rest[j].float().numpy()
        for array in self.arrays.values():
            array.flush()
        self.filled[index] = True
        _save_atomic(self.folder / "filled.npy", self.filled)

    def report(self) -> dict:
        """Its bytes on disk (its arrays are sparse files: unfilled rows take none), how much of it is filled, and the teacher mass its top-k keeps (filled rows)."""
        size = sum(f.stat().st_blocks * 512 for f in self.folder.iterdir() if f.is_file())  # on disk (sparse files)
        rows = np.flatnonzero(self.filled)[:256]
        kept = float(np.exp(np.logaddexp.reduce(self.arrays["logp"][rows], axis=-1)).mean()) if len(rows) else None
        return {"folder": str(self.folder), "bytes": size, "k": self.k, "sequences": int(self.filled.size),
                "filled": int(self.filled.sum()), "mean_kept_mass": kept, "key": self.meta["key"]}


def open_cache(folder: str | Path, key: dict, rows: int, width: int, k: int, vocab: int) -> TeacherCache:
    """The cache at `folder` for `key` (made empty if the folder does not exist); refused if it was made for
    another key or its files are damaged."""
    folder = Path(folder)
    if not folder.exists():
        _create(folder, key, rows, width, k, vocab)
    meta = _read_meta(folder)
    for name in sorted(set(key) | set(meta["key"])):
        require(meta["key"].get(name) == key.get(name), f"teacher cache {folder} was made for another "
                f"{name.replace('_', ' ')} ({meta['key'].get(name)!r} there, {key.get(name)!r} now); "
                "give another --teacher-cache folder")
    expected = {"index": (rows, width, k), "logp": (rows, width, k), "rest": (rows, width)}
    arrays = {name: _open_array(folder / f"{name}.npy", expected[name]) for name in ARRAYS}
    filled = _open_array(folder / "filled.npy", (rows,), writable=False).copy()
    require(filled.dtype == np.bool_, f"teacher cache {folder}: filled.npy is not boolean")
    return TeacherCache(folder, meta, arrays, filled)


def _create(folder: Path, key: dict, rows: int, width: int, k: int, vocab: int) -> None:
    """Write an empty cache in a temporary folder and rename it into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    shapes = {"index": ((rows, width, k), ids_dtype), "logp": ((rows, width, k), np.float32),
              "rest": ((rows, width), np.float32)}
    for name, (shape, dtype) in shapes.items():
        np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    np.save(tmp / "filled.npy", np.zeros(rows, dtype=bool))
    meta = {"format": FORMAT, "version": 1, "key": key, "rows": rows, "width": width, "k": k, "vocab": vocab}
    (tmp / "cache.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder)


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "cache.json").read_text())
    except (OSError, ValueError) as exc:
        raise SlmError(f"{folder} is not a teacher cache ({exc.__class__.__name__}: {exc})") from None
    require(isinstance(meta, dict) and meta.get("format") == FORMAT and isinstance(meta.get("key"), dict),
            f"{folder} is not a teacher cache (no {FORMAT} cache.json)")
    return meta


def _open_array(path: Path, shape: tuple, writable: bool = True) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r+" if writable else "r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SlmError(f"teacher cache file {path} is damaged ({exc}); delete the cache folder to rebuild it") from None
    require(array.shape == shape, f"teacher cache file {path} holds shape {array.shape}, expected {shape}; delete the "
            "cache folder to rebuild it")
    return array


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
