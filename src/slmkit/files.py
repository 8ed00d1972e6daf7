"""Where slmkit writes: atomic outputs (complete under their name, or not at all) and its cache folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import require


def cache_dir() -> Path:
    """slmkit's cache folder: $SLMKIT_CACHE, default ~/.cache/slmkit (compiled kernels, machine speeds)."""
    return Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache" / "slmkit"))


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False, is_dir: bool = True):
    """Yield a temporary path beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    require(force or not out.exists(), f"{out} exists; pass --force to overwrite")
    require(out.parent.is_dir() or not str(out.parent), f"{out.parent}: no such directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    target = tmp if is_dir else tmp / out.name
    try:
        yield target
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: readers see the old
    file or the new one, never a part; on failure nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
