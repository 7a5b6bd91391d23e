"""The journal of finished requests: round trip, torn tails repaired before appending, corrupt
lines refused in one line, the lock, the fsync rule, and kill -9 losing no acknowledged line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoptune import UserError
from shoptune.journal import FAILURE, NOT_SENT, SUCCESS, Journal, Outcome

ROOT = Path(__file__).resolve().parents[1]


def success(key: str, text: str = "hello") -> Outcome:
    usage = {"prompt_tokens": 10, "completion_tokens": 3}
    return Outcome(key, SUCCESS, text=text, finish_reason="stop", usage=usage, attempts=1)


def failure(key: str, permanent: bool) -> Outcome:
    return Outcome(key, FAILURE, attempts=2, failure="http_400", reason="HTTP 400: too long", permanent=permanent)


def test_outcomes_of_every_kind_round_trip(tmp_path):
    path = tmp_path / "journal.jsonl"
    written = [success("a", "réponse\nsur deux lignes"), failure("b", True), failure("c", False)]
    with Journal(path) as journal:
        for outcome in written:
            journal.append(outcome)
    with Journal(path) as journal:
        assert [journal.outcomes[o.key] for o in written] == written
        assert journal.final("a") == written[0] and journal.final("b") == written[1]
        assert journal.final("c") is None  # the retry budget ran out: the next run sends it again
        assert "c" in journal and len(journal) == 3
    assert path.read_text(encoding="utf-8").count("\n") == 3


def test_the_last_line_of_a_key_counts(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append(failure("a", False))
        journal.append(success("a"))
    with Journal(path) as journal:
        assert journal.outcomes["a"].status == SUCCESS


@pytest.mark.parametrize("tail", [b'{"key": "x", "sta', b"\0\0\0\0", b'{"key": "x", "status": "succ\n'])
def test_a_torn_tail_is_cut_away_before_appending(tmp_path, tail):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append(success("a"))
        journal.append(success("b"))
    clean = path.read_bytes()
    path.write_bytes(clean + tail)
    with Journal(path) as journal:
        assert set(journal.outcomes) == {"a", "b"}
        assert journal.repaired_bytes == len(tail)
        assert path.read_bytes() == clean  # repaired on opening, before anything is appended
        journal.append(success("c"))
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b", "c"]


def test_a_whole_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps(success("a").record()), encoding="utf-8")
    with Journal(path) as journal:
        assert journal.outcomes["a"] == success("a") and journal.repaired_bytes == 0
        journal.append(success("b"))
    assert [json.loads(line)["key"] for line in path.read_bytes().splitlines()] == ["a", "b"]


def test_a_corrupt_line_in_the_middle_is_one_line_error(tmp_path):
    path = tmp_path / "journal.jsonl"
    good = json.dumps(success("a").record())
    path.write_text(f"{good}\nnot json\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}: line 2 is not JSON \(.*\)$") as caught:
        Journal(path)
    assert "\n" not in str(caught.value)
    path.write_text(f'{good}\n{{"status": "success"}}\n{good}\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}: line 2 is not a journal record"):
        Journal(path)
    assert path.read_text(encoding="utf-8").count("\n") == 3  # left as it was, for a person to look at


def test_only_finished_requests_are_journaled(tmp_path):
    with Journal(tmp_path / "journal.jsonl") as journal, pytest.raises(ValueError, match="not_sent"):
        journal.append(Outcome("a", NOT_SENT))


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path):
        with pytest.raises(UserError, match="in use by another process"):
            Journal(path)
    Journal(path).close()  # the lock goes with close


def test_fsync_follows_the_interval(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with Journal(tmp_path / "every.jsonl", sync_interval=0) as journal:
        for key in "abc":
            journal.append(success(key))
        assert len(synced) == 3
    for interval in (3600, None):
        synced.clear()
        with Journal(tmp_path / f"batched-{interval}.jsonl", sync_interval=interval) as journal:
            for key in "abc":
                journal.append(success(key))
            assert synced == []
            journal.sync()
            journal.sync()  # nothing new: no fsync
            assert len(synced) == 1
        assert len(synced) == 2  # on close


def test_group_commit_counts_as_durable_only_what_was_appended_before_the_fsync(tmp_path, monkeypatch):
    real_fsync = os.fsync
    with Journal(tmp_path / "j.jsonl", sync_interval=None) as journal:
        for key in "abc":
            journal.append(success(key))
        assert (journal.appended, journal.durable) == (3, 0)

        def fsync_while_another_line_comes(fd):  # the worker thread's fsync races an append
            monkeypatch.setattr(os, "fsync", real_fsync)
            journal.append(success("d"))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync_while_another_line_comes)
        assert journal.sync() == 3  # "d" may have missed this fsync: not counted
        assert (journal.appended, journal.durable) == (4, 3)
        assert journal.sync() == 4
    assert journal.durable == 4


APPENDER = """
import sys
from shoptune.journal import Journal, Outcome
journal = Journal(sys.argv[1], sync_interval=3600)   # no fsync: kill -9 must still lose nothing acknowledged
for i in range(1_000_000):
    journal.append(Outcome(f"key-{i}", "success", text="x" * 500, finish_reason="stop", attempts=1))
    print(i + 1, flush=True)
"""


def test_kill_9_loses_no_acknowledged_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    acknowledged = 0
    while acknowledged < 2000 and time.monotonic() < deadline:
        acknowledged = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert acknowledged >= 2000
    with Journal(path) as journal:
        assert len(journal) >= acknowledged
        assert all(f"key-{i}" in journal for i in range(acknowledged))


FILLER = """
import resource, signal, sys
from shoptune import UserError
from shoptune.journal import Journal, Outcome
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
journal = Journal(sys.argv[1])
try:
    for i in range(1000):
        journal.append(Outcome(f"key-{i}", "success", text="x" * 300, finish_reason="stop", attempts=1))
except UserError as err:
    print(err)
"""


def test_a_failed_write_is_one_line_and_leaves_no_torn_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    child = subprocess.run(
        [sys.executable, "-c", FILLER, str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert child.stdout == f"{path}: cannot append to the journal (File too large)\n"
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data) < 10_000
    with Journal(path) as journal:
        assert journal.repaired_bytes == 0 and len(journal) == data.count(b"\n")
