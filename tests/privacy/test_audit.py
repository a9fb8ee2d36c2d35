import hashlib
import itertools
import json
import threading
import warnings
from typing import Any

import pytest

from pimoe.privacy.audit import AuditLog
from pimoe.privacy.crypto import IntegrityError


def _log(tmp_path, n: int = 5, key: bytes | None = None) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", key=key)
    for i in range(n):
        log.record("round", round=i, clients=10, epsilon=0.5 * i)
    return log


def _rewrite(log: AuditLog, edit) -> None:
    lines = log.path.read_text().splitlines(keepends=True)
    log.path.write_text("".join(edit(lines)))


def test_one_json_line_per_event_with_timestamp(tmp_path) -> None:
    log = _log(tmp_path, 3)
    log.record("key_use", purpose="checkpoint")
    lines = log.path.read_text().splitlines()
    assert len(lines) == 4
    entries = [json.loads(line) for line in lines]
    assert [e["event"] for e in entries] == ["round", "round", "round", "key_use"]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert entries[2]["epsilon"] == 1.0 and entries[3]["purpose"] == "checkpoint"
    assert all(e["ts"].endswith("+00:00") for e in entries)
    assert log.verify(expected_head=log.head) == 4
    assert log.entries() == entries


def test_reopened_log_appends_and_keeps_the_chain(tmp_path) -> None:
    first = _log(tmp_path, 2)
    again = AuditLog(first.path)
    assert again.head == first.head
    again.record("round", round=2)
    assert again.verify() == 3
    assert json.loads(again.path.read_text().splitlines()[0])["round"] == 0  # old lines kept


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda ls: [ls[0], ls[1].replace('"clients": 10', '"clients": 11'), *ls[2:]],
            "line 2: hash mismatch",
        ),
        (lambda ls: [ls[0], *ls[2:]], "line 2: chain broken"),
        (lambda ls: [ls[1], ls[0], *ls[2:]], "line 1: chain broken"),
        (lambda ls: [*ls[:2], ls[2], *ls[2:]], "line 4: chain broken"),
        (lambda ls: [*ls[:3], "not json\n", *ls[3:]], "line 4: not an audit entry"),
        (
            lambda ls: [*ls[:3], "[1, 2]\n", *ls[3:]],
            "line 4: not an audit entry",
        ),  # JSON, no object
    ],
)
def test_edits_are_detected(tmp_path, edit, match: str) -> None:
    log = _log(tmp_path)
    _rewrite(log, edit)
    with pytest.raises(IntegrityError, match=match):
        log.verify()


def test_truncated_tail_detected_with_a_kept_head(tmp_path) -> None:
    log = _log(tmp_path)
    head = log.head
    _rewrite(log, lambda ls: ls[:-2])
    assert log.verify() == 3  # a shorter chain is still a valid chain ...
    with pytest.raises(IntegrityError, match="expected head"):
        log.verify(expected_head=head)  # ... but not the one we last wrote


def _forge_last_line(log: AuditLog) -> None:
    """What someone with write access does: edit the last entry and recompute its SHA-256 hash."""
    entries = log.entries()
    entry = entries[-1]
    entry.pop("hash")
    entry["epsilon"] = 0.0
    entry["hash"] = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()
    log.path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def test_keyed_chain_cannot_be_rebuilt_without_the_key(tmp_path) -> None:
    plain = _log(tmp_path / "plain", 3)
    _forge_last_line(plain)
    assert plain.verify() == 3  # an unkeyed chain only detects edits that do not recompute hashes
    keyed = _log(tmp_path / "keyed", 3, key=b"k" * 32)
    assert keyed.verify() == 3
    with pytest.raises(IntegrityError, match="wrong key"):
        AuditLog(keyed.path, key=b"x" * 32).verify()
    _forge_last_line(keyed)
    with pytest.raises(IntegrityError, match="line 3: hash mismatch"):
        keyed.verify()


def test_concurrent_records_from_threads_keep_one_chain(tmp_path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    threads = [
        threading.Thread(target=lambda i=i: [log.record("t", thread=i, n=n) for n in range(20)])
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.verify() == 80


def test_bad_records_rejected(tmp_path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="reserved"):
        log.record("round", hash="x")
    with pytest.raises(ValueError, match="non-empty"):
        log.record("")
    with pytest.raises(TypeError, match="JSON"):
        log.record("round", value=object())
    with pytest.raises(TypeError, match="JSON"):
        log.record("round", epsilon=float("nan"))
    with pytest.raises(ValueError, match="16 bytes"):
        AuditLog(tmp_path / "other.jsonl", key=b"short")
    assert log.verify() == 0


def test_torn_last_line_is_dropped_reported_and_recorded(tmp_path) -> None:
    log = _log(tmp_path, 4)
    whole = log.path.read_bytes()
    torn = b'{"event": "round", "epsilon": 2.5, "pr'  # a writer killed in the middle of its line
    log.path.write_bytes(whole + torn)
    with pytest.warns(
        RuntimeWarning, match=f"dropped a torn last line \\({len(torn)} bytes\\).*4 entries"
    ):
        reopened = AuditLog(log.path)
    assert reopened.dropped_bytes == len(torn)
    assert log.path.read_bytes().startswith(whole)  # the verified prefix is kept byte for byte
    last = reopened.entries()[-1]
    assert (last["event"], last["dropped_bytes"], last["seq"]) == (
        "torn_tail_dropped",
        len(torn),
        5,
    )
    reopened.record("round", round=5)
    assert reopened.verify(expected_head=reopened.head) == 6


def test_torn_tail_met_by_a_running_writer_and_a_line_missing_only_its_newline(tmp_path) -> None:
    log = _log(tmp_path, 2)
    other = AuditLog(log.path)  # opened before another writer crashed
    other.record("round", round=2)
    line = log.path.read_bytes().splitlines(keepends=True)[-1]
    log.path.write_bytes(
        log.path.read_bytes()[: -len(line)] + line[:-1]
    )  # whole entry, newline lost
    assert AuditLog(log.path).dropped_bytes == 0 and log.verify() == 3  # kept: it verifies
    log.path.write_bytes(
        log.path.read_bytes() + b"\x00" * 40
    )  # a crash left zeros after the last line
    with pytest.warns(RuntimeWarning, match="40 bytes"):
        log.record("round", round=3)  # the writer repairs before it appends
    assert [e["event"] for e in log.entries()[-2:]] == [
        "torn_tail_dropped",
        "round",
    ] and log.verify() == 5


def test_damage_before_the_tail_is_not_repaired(tmp_path) -> None:
    log = _log(tmp_path, 3)
    _rewrite(log, lambda ls: [*ls[:-1], "garbage\n"])  # a complete line: not a torn write
    before = log.path.read_bytes()
    with pytest.raises(IntegrityError, match="last complete line is not an audit entry"):
        AuditLog(log.path)
    assert log.path.read_bytes() == before  # nothing truncated
    edited = _log(tmp_path / "edited", 3)
    _rewrite(
        edited, lambda ls: [ls[0], ls[1].replace('"clients": 10', '"clients": 12'), ls[2], "x" * 10]
    )
    with pytest.warns(RuntimeWarning, match="10 bytes"):
        reopened = AuditLog(edited.path)  # only the torn tail is repaired ...
    with pytest.raises(IntegrityError, match="line 2: hash mismatch"):
        reopened.verify()  # ... the edited line is still reported


def _append_many(path: str, writer: int, count: int, start: Any) -> None:
    log = AuditLog(path)  # opened once: its in-memory head goes stale as the others append
    start.wait(timeout=30)
    for n in range(count):
        log.record("write", writer=writer, n=n)


def test_writer_processes_share_one_chain(tmp_path) -> None:
    import multiprocessing

    path = str(tmp_path / "audit.jsonl")
    AuditLog(path).record("start")
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (POSIX)")
    context = multiprocessing.get_context("fork")  # the writers only touch the file
    start = context.Barrier(4)
    workers = [context.Process(target=_append_many, args=(path, w, 25, start)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    log = AuditLog(path)
    assert log.verify(expected_head=log.head) == 101
    writers = [e["writer"] for e in log.entries()[1:]]
    assert sorted(writers) == sorted(list(range(4)) * 25)
    assert any(a != b for a, b in itertools.pairwise(writers))  # the writers really interleaved


def test_a_crash_at_any_byte_of_the_last_line_recovers(tmp_path) -> None:
    log = _log(tmp_path, 3)
    data = log.path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1  # the last line
    for cut in range(start, len(data) + 1):
        log.path.write_bytes(data[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reopened = AuditLog(log.path)
        whole = cut >= len(data) - 1  # the entry is complete (its newline may be missing)
        assert reopened.dropped_bytes == (0 if whole or cut == start else cut - start), cut
        assert len(caught) == (reopened.dropped_bytes > 0)
        events = [e["event"] for e in reopened.entries()]
        assert events == ["round"] * (3 if whole else 2) + (
            ["torn_tail_dropped"] if reopened.dropped_bytes else []
        )
        assert reopened.verify(expected_head=reopened.head) == len(events)
