"""The journal of finished LLM requests: an append-only JSON-lines file, one outcome per line.

A run that is killed, cancelled or stopped by its budget resumes from its journal: a request
whose key has a final outcome there (a success, or a permanent failure such as an HTTP 400) is
never sent again, so nothing is paid twice. A failure after the retry budget (the service was
unwell: 429s, 5xx, timeouts) is journaled too, but as not final: the next run sends it again.
When a key appears on several lines the last one counts.

Opening (`Journal(path)`):
  * every complete line is read into `outcomes` (key -> Outcome);
  * a torn tail (bytes after the last newline, or a last line that is not JSON: what a crash in
    the middle of a write or a power cut leaves) is truncated away and the truncation fsync'd
    before anything is appended, so new lines never follow garbage (a whole record that only
    lacks its newline is kept, and the newline added);
  * a line that is not a record anywhere else is a UserError naming the file and the line: the
    file was damaged by something other than a crash, and a person should look at it;
  * an exclusive lock (flock) is taken: a second process appending to the same journal is an error.

Appending (`append(outcome)`): the line is handed to the kernel with one write() on an O_APPEND
descriptor before `append` returns. Durability rule: an appended line survives a kill -9 of this
process as soon as `append` has returned (the kernel has it); it survives a power cut or a kernel
crash once fsync'd. fsync runs after an append when `sync_interval` seconds have passed since the
last one (0: after every append; None: never there), on `sync()` and on `close()`. A power cut
therefore loses at most the lines of the last `sync_interval` seconds; those requests are sent again
on resume. `sync()` may run in another thread while appends go on (the LLM client fsyncs every half
second from a worker thread, so that its event loop never waits for the disk): group commit, one
fsync for every line appended before it. `appended` counts the lines appended through this object,
`durable` how many of them are known to be fsync'd (what may be reported as safely journaled). A write or fsync
that fails (disk full) is a one-line UserError, and the part of the line written is cut away.

The journal's order is the order in which requests finished; readers order outputs by their own
request order, never by the journal's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from shoptune import UserError

SUCCESS, FAILURE, NOT_SENT = "success", "failure", "not_sent"


@dataclasses.dataclass
class Outcome:
    """How one request ended.

    success: `text`, `finish_reason` ("stop", "length", ...), `usage`.
    failure: `failure` (a short kind for counting: "http_400", "timeout", "refusal", ...) and
    `reason` (one line: status and message); `permanent` failures are final (never resent),
    the others (retry budget spent, run stopped by an authentication error) are resent by the next run.
    not_sent: the run stopped (budget, cancellation) before sending it; never journaled.
    `usage` ({"prompt_tokens", "completion_tokens"}) sums every attempt that the API answered with usage
    (an empty reply that was retried was paid too); `attempts` counts this run's HTTP attempts.
    """

    key: str
    status: str
    text: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    attempts: int = 0
    failure: str | None = None
    reason: str | None = None
    permanent: bool = False

    @property
    def final(self) -> bool:
        """True when the request must not be sent again."""
        return self.status == SUCCESS or (self.status == FAILURE and self.permanent)

    def record(self) -> dict[str, Any]:
        """The journal line's fields (the empty ones left out)."""
        record = {name: getattr(self, name) for name in FIELDS}  # not asdict: it deep-copies, slowly
        return {k: v for k, v in record.items() if v is not None and not (k == "permanent" and not v)}

    @classmethod
    def from_record(cls, record: Any) -> Outcome:
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise ValueError("not an outcome record (no key)")
        if record.get("status") not in (SUCCESS, FAILURE):
            raise ValueError(f"not an outcome record (status {record.get('status')!r})")
        return cls(**{k: v for k, v in record.items() if k in FIELDS})


def complete_record(data: bytes) -> bool:
    try:
        Outcome.from_record(json.loads(data))
    except (ValueError, TypeError):
        return False
    return True


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__


FIELDS = tuple(field.name for field in dataclasses.fields(Outcome))


class Journal:
    """An open journal: `outcomes` holds what earlier runs (and this one) finished."""

    def __init__(self, path: str | Path, *, sync_interval: float | None = 0.5):
        self.path = Path(path)
        self.sync_interval = sync_interval
        self.outcomes: dict[str, Outcome] = {}
        self.repaired_bytes = 0  # bytes of torn tail cut away on opening
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.path}: the journal is in use by another process") from None
            self._read_and_repair()
        except BaseException:
            os.close(self._fd)
            raise
        self.appended = 0  # lines appended through this object
        self.durable = 0  # of those, the first `durable` are fsync'd (group commit: one fsync for many lines)
        self._count_lock = threading.Lock()
        self._last_sync = time.monotonic()

    def _read_and_repair(self) -> None:
        with open(self._fd, "rb", closefd=False) as handle:
            data = handle.read()
        lines = data.split(b"\n")
        torn = lines.pop()  # the bytes after the last newline: b"" when the file ends cleanly
        keep = len(data) - len(torn)
        if torn and complete_record(torn):  # all of a line but its newline was written: keep it
            os.write(self._fd, b"\n")
            lines.append(torn)
            keep, torn = len(data) + 1, b""
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                if number == len(lines) and not torn:  # the last line, cut short by a crash
                    keep -= len(line) + 1
                    break
                raise UserError(f"{self.path}: line {number} is not JSON ({one_line(err)})") from None
            try:
                outcome = Outcome.from_record(record)
            except (ValueError, TypeError) as err:
                raise UserError(f"{self.path}: line {number} is not a journal record ({one_line(err)})") from None
            self.outcomes[outcome.key] = outcome
        if keep < len(data):
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
            self.repaired_bytes = len(data) - keep

    # ---------------------------------------------------------------- reading

    def __contains__(self, key: str) -> bool:
        return key in self.outcomes

    def __len__(self) -> int:
        return len(self.outcomes)

    def final(self, key: str) -> Outcome | None:
        """The journaled outcome of `key` if it must not be sent again, else None."""
        outcome = self.outcomes.get(key)
        return outcome if outcome is not None and outcome.final else None

    # ---------------------------------------------------------------- writing

    def append(self, outcome: Outcome) -> None:
        """Journal a finished request (see the durability rule in the module docstring)."""
        if outcome.status not in (SUCCESS, FAILURE):
            raise ValueError(f"only finished requests are journaled, not {outcome.status!r}")
        if self._fd < 0:
            raise ValueError(f"{self.path}: the journal is closed")
        line = (json.dumps(outcome.record(), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        size = os.fstat(self._fd).st_size
        try:
            while view:  # a regular file takes the whole line in one write; loop in case it does not
                view = view[os.write(self._fd, view) :]
        except OSError as err:  # a disk full: cut the part written, or the next line would follow it
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise UserError(f"{self.path}: cannot append to the journal ({err.strerror})") from None
        self.outcomes[outcome.key] = outcome
        with self._count_lock:
            self.appended += 1
        if self.sync_interval is not None and time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()

    def sync(self) -> int:
        """fsync what was appended before this call (safe from another thread); returns `durable`:
        the lines appended so far that are on disk (all of them when no append ran meanwhile)."""
        with self._count_lock:
            appended = self.appended
        if appended > self.durable and self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as err:
                raise UserError(f"{self.path}: cannot write the journal to disk ({err.strerror})") from None
            with self._count_lock:
                self.durable = max(self.durable, appended)
        self._last_sync = time.monotonic()
        return self.durable

    def close(self) -> None:
        """fsync and close (no sync() may be running in another thread)."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)  # releases the lock
            self._fd = -1
            self.durable = self.appended

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
