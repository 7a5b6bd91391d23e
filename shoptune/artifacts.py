"""Writing stage outputs so that a crash never leaves a half-written file or folder, and the
same inputs give the same bytes.

Every output is written under a temporary name beside its final path and renamed
into place once complete; a rename within one filesystem is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds.

    The temporary folder is `.{name}.{pid}.{random}.tmp`. A process killed before it could
    remove its own (SIGKILL, a stopped container, a power cut) leaves it behind: the next
    atomic_dir of the same path removes it, unless the process that wrote it still runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the `.{name}.{pid}.{random}.tmp` folders beside `path` whose writer is gone."""
    temporary = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[a-z0-9_]+\.tmp")
    for sibling in path.parent.iterdir():
        match = temporary.fullmatch(sibling.name)
        if match and sibling.is_dir() and not sibling.is_symlink():
            if not may_be_writing(int(match[1]), sibling.stat().st_mtime):
                shutil.rmtree(sibling, ignore_errors=True)


def may_be_writing(pid: int, modified: float) -> bool:
    """Whether process `pid` may be the one that wrote a folder last modified at `modified`:
    it runs, and (where /proc tells) it started before that. A process started later has only
    reused the number (or runs in another PID namespace, as a container's stage does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process: let it be
    started = process_start_time(pid)
    return started is None or started <= modified + 2  # a margin for the clocks' resolutions


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime, after "pid (comm) "
    return int(boot.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")


def dumps(obj) -> str:
    """The one JSON encoding of the project: stable key order, UTF-8 kept readable."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_file(path) as out:
        for row in rows:
            out.write(dumps(row) + "\n")
            count += 1
    return count


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as out:
        out.write(json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; a bad line is a UserError naming the file and line."""
    from shoptune import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def sort_safetensors_metadata(path: str | Path) -> None:
    """Put the __metadata__ of a safetensors file in key order, in place.

    safetensors writes __metadata__ from a Rust HashMap, whose order changes from process to
    process: with two entries or more (AutoAWQ records the tied lm_head), the same weights
    give different bytes. Only the header's bytes are rewritten; its length does not change.
    """
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        if len(text) > length:
            raise ValueError(f"{path}: the sorted safetensors header does not fit ({len(text)} > {length} bytes)")
        handle.seek(8)
        handle.write(text.ljust(length, b" "))
