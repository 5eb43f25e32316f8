"""A batch's manifest: one JSON line per finished job, safe against kills and shared by processes.

Each process appends whole lines to its own part file (``manifest.part-RANK.jsonl``), flushed and
fsynced, so a killed process loses at most the job it was running (a torn last line is ignored).
At the end one process merges everything into ``manifest.jsonl`` (temp file + ``os.replace``) and
removes the parts. Reading takes the manifest and any parts left by an interrupted run.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part-*.jsonl"

__all__ = ["MANIFEST", "PartWriter", "NewLines", "read_entries", "finished", "merge", "remove_stale_temps"]


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the torn last line of a killed writer
            continue
        if isinstance(entry, dict) and isinstance(entry.get("index"), int):
            yield entry


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob(PART_GLOB))


def read_entries(directory: str | Path) -> list[dict[str, Any]]:
    """Every entry recorded in `directory`: the merged manifest's, then the parts' (oldest first)."""
    d = Path(directory)
    return [e for p in [d / MANIFEST, *_parts(d)] for e in _lines(p)]


class NewLines:
    """Counts the lines appended to the part files since the last call (all processes' progress),
    reading only what was appended."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.offsets = {p: p.stat().st_size for p in _parts(self.directory)}

    def __call__(self) -> int:
        n = 0
        for p in _parts(self.directory):
            with open(p, "rb") as f:
                f.seek(self.offsets.get(p, 0))
                data = f.read()
            self.offsets[p] = self.offsets.get(p, 0) + len(data)
            n += data.count(b"\n")
        return n


def remove_stale_temps(directory: str | Path) -> None:
    """Delete the temporary files a killed run left (``.job-*.tmp``, ``.manifest.jsonl.*.tmp``)."""
    for p in [*Path(directory).glob(".job-*.tmp"), *Path(directory).glob(f".{MANIFEST}.*.tmp")]:
        p.unlink(missing_ok=True)


def _best(entries: list[dict[str, Any]], keys: Mapping[int, str]) -> dict[int, dict[str, Any]]:
    """Per job index, the entry of the job as it is now (same key): the last ``ok`` one, else the last."""
    best: dict[int, dict[str, Any]] = {}
    for e in entries:
        i = e["index"]
        if keys.get(i) != e.get("key"):
            continue
        if i in best and best[i].get("status") == "ok" and e.get("status") != "ok":
            continue
        best[i] = e
    return best


def finished(directory: str | Path, keys: Mapping[int, str]) -> set[int]:
    """The jobs (index → key of their current settings) done before: an ``ok`` entry with the same
    key whose files all still exist. Failed jobs are not finished; a re-run tries them again."""
    d = Path(directory)
    done = set()
    for i, e in _best(read_entries(d), keys).items():
        if e.get("status") == "ok" and all((d / f["path"]).is_file() for f in e.get("files", [])):
            done.add(i)
    return done


def merge(directory: str | Path, keys: Mapping[int, str]) -> list[dict[str, Any]]:
    """Write ``manifest.jsonl`` (the current jobs' entries, by index) atomically, then drop the parts."""
    d = Path(directory)
    parts = _parts(d)
    entries = [e for _, e in sorted(_best(read_entries(d), keys).items())]
    tmp = d / f".{MANIFEST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    for p in parts:
        p.unlink(missing_ok=True)
    return entries


class PartWriter:
    """Appends entries to one process's part file, each a whole line, flushed and fsynced."""

    def __init__(self, directory: str | Path, rank: int):
        self.path = Path(directory) / f"manifest.part-{rank:05d}.jsonl"
        self.file = open(self.path, "ab")  # noqa: SIM115 (closed by close())
        if self.file.tell() > 0:  # a killed writer may have left a torn line: start a fresh one
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self.file.write(b"\n")

    def write(self, entry: Mapping[str, Any]) -> None:
        self.file.write((json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
