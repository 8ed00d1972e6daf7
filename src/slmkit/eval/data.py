"""Text and task data from local files (txt, jsonl, parquet, folders), named data sets, or the Hugging Face hub.

Named sources resolve to the project's shared data folder (`../shared/data/` beside the repository, or
$SLMKIT_DATA): `wikitext2` (raw test), `wikitext2-valid`, `tinyshakespeare`, `arc_easy`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlmError, require

NAMED_FILES = {"wikitext2": "wikitext2/wikitext-2-raw/wiki.test.raw", "wikitext2-valid": "wikitext2/wikitext-2/valid.txt",
               "tinyshakespeare": "tinyshakespeare/input.txt", "arc_easy": "arc_easy/ARC-Easy-Test.jsonl"}
TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".parquet")


@dataclass
class Text:
    text: str
    source: str  # what was read (path or dataset name)
    normalization: str  # what was done to the characters before tokenizing


def shared_data_dir() -> Path:
    """$SLMKIT_DATA, else `shared/data` beside the repository or the working directory."""
    if os.environ.get("SLMKIT_DATA"):
        return Path(os.environ["SLMKIT_DATA"])
    here = Path(__file__).resolve()
    for root in (here.parents[3].parent, Path.cwd().parent, Path.cwd()):
        if (root / "shared" / "data").is_dir():
            return root / "shared" / "data"
    raise SlmError("shared data folder not found: set SLMKIT_DATA to the folder holding wikitext2/, arc_easy/ ...")


def resolve_source(spec: str) -> Path | None:
    """A named source or an existing path -> a local path; None for something that may be a hub dataset."""
    if spec in NAMED_FILES:
        path = shared_data_dir() / NAMED_FILES[spec]
        require(path.is_file(), f"{spec}: expected {path}, which does not exist")
        return path
    path = Path(spec).expanduser()
    return path if path.exists() else None


def read_text(spec: str) -> Text:
    """All text of a source, line endings normalised (CRLF -> LF, nothing else changed)."""
    path = resolve_source(spec)
    if path is None:
        return _hub_text(spec)
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    require(bool(files), f"{path}: no {', '.join(TEXT_SUFFIXES)} files")
    text = "\n\n".join(_file_text(f) for f in files)
    require(text.strip() != "", f"{path}: no text (empty)")
    return Text(text.replace("\r\n", "\n"), str(path), "utf-8; CRLF -> LF; nothing else")


def _file_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "\n\n".join(rec["text"] for rec in read_jsonl(path, required=("text",)))
    if path.suffix == ".parquet":
        return "\n\n".join(_parquet_column(path, "text"))
    data = path.read_bytes()
    require(b"\x00" not in data[:65536], f"{path}: binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SlmError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSON Lines file; a malformed line is reported with its number."""
    data = path.read_bytes()
    require(b"\x00" not in data[:65536], f"{path}: binary file, not JSON Lines")
    records = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SlmError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
        require(isinstance(rec, dict), f"{path}:{number}: expected a JSON object")
        missing = [k for k in required if k not in rec]
        require(not missing, f"{path}:{number}: missing field(s) {', '.join(missing)}")
        records.append(rec)
    require(bool(records), f"{path}: no records (empty)")
    return records


def _parquet_column(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SlmError("reading .parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    require(column in table.column_names, f"{path}: no '{column}' column")
    return [str(v) for v in table.column(column).to_pylist()]


def _hub_text(spec: str) -> Text:
    """`name[:config[:split]]` from the Hugging Face hub (needs `datasets` and a network)."""
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
        rows = datasets.load_dataset(name, config, split=split or "test")
    except ImportError:
        raise SlmError(f"{spec}: not a local file; hub datasets need `pip install datasets`") from None
    except Exception as exc:
        raise SlmError(f"{spec}: no such file, and not loadable from the hub ({type(exc).__name__})") from None
    return Text("\n\n".join(rows["text"]).replace("\r\n", "\n"), f"hub:{spec}", "joined rows; CRLF -> LF")
