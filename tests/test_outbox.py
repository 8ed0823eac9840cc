"""The durable outbox on its own: order, idempotence, receipts, resends, bounds, crash safety."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent.errors import PayloadTooLargeError
from device_agent.outbox import OUTBOX_FILE, Outbox, OutboxEntry, OutboxError
from fleet_protocol import (
    MAX_PAYLOAD_BYTES,
    AckMessage,
    AckStatus,
    LogLevel,
    LogMessage,
    ReportedState,
    TelemetryMessage,
    TopicKind,
)


def telemetry(**fields: object) -> TelemetryMessage:
    values: dict[str, object] = {
        "cpu_percent": 1.0,
        "load_1": 0.1,
        "load_5": 0.1,
        "load_15": 0.1,
        "memory_percent": 10.0,
        "memory_used_bytes": 1,
        "memory_total_bytes": 10,
        "disk_percent": 10.0,
        "disk_used_bytes": 1,
        "disk_total_bytes": 10,
        "net_bytes_sent": 0,
        "net_bytes_recv": 0,
        "uptime_s": 1.0,
        "agent_version": "test",
        "architecture": "x86_64",
        "platform": "test",
    }
    values.update(fields)
    return TelemetryMessage.model_validate(values)


def ack(n: int = 0) -> AckMessage:
    return AckMessage(command_id=f"command-{n:08d}", status=AckStatus.SUCCEEDED)


def log(text: str = "something happened") -> LogMessage:
    return LogMessage(level=LogLevel.WARNING, logger="test", message=text)


def everything(outbox: Outbox) -> list[OutboxEntry]:
    """Every stored entry in order, sent or not."""
    return outbox.due(1_000_000, resend_after_s=0.0, now=math.inf)


def stored_ids(outbox: Outbox) -> list[str]:
    return [entry.message_id for entry in everything(outbox)]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox.in_state_dir(tmp_path) as box:
        yield box


def test_entries_come_out_in_the_order_they_were_put(outbox: Outbox) -> None:
    messages = [telemetry(), ack(1), log(), telemetry(), ack(2)]
    kinds = [TopicKind.TELEMETRY, TopicKind.ACKS, TopicKind.LOGS, TopicKind.TELEMETRY]
    kinds.append(TopicKind.ACKS)
    for kind, message in zip(kinds, messages, strict=True):
        outbox.put(kind, message)

    due = outbox.due(10, resend_after_s=30, now=0.0)

    assert [e.message_id for e in due] == [m.message_id for m in messages]
    assert [e.kind for e in due] == kinds
    assert [e.payload for e in due] == [m.to_payload() for m in messages]
    assert all(e.attempts == 0 and not e.retain and e.model is None for e in due)
    assert [e.seq for e in due] == sorted(e.seq for e in due)
    assert [e.message_id for e in outbox.due(2, resend_after_s=30, now=0.0)] == [
        m.message_id for m in messages[:2]
    ]


def test_putting_the_same_message_twice_stores_it_once(outbox: Outbox) -> None:
    message = telemetry()
    outbox.put(TopicKind.TELEMETRY, message)
    outbox.put(TopicKind.TELEMETRY, message)
    outbox.put_many([(TopicKind.TELEMETRY, message, None, False)])

    assert outbox.depth() == 1
    assert outbox.size_bytes() == len(message.to_payload())


def test_confirm_deletes_named_entries_and_counts_only_those_present(outbox: Outbox) -> None:
    first, second, third = telemetry(), ack(), log()
    outbox.put(TopicKind.TELEMETRY, first)
    outbox.put(TopicKind.ACKS, second)
    outbox.put(TopicKind.LOGS, third)

    assert outbox.confirm([first.message_id, "never-stored-id", first.message_id]) == 1
    assert outbox.confirm([]) == 0
    assert stored_ids(outbox) == [second.message_id, third.message_id]
    assert outbox.confirm([second.message_id, third.message_id]) == 2
    assert outbox.depth() == 0
    assert outbox.size_bytes() == 0
    assert outbox.oldest_age_s(now=0.0) is None


def test_confirm_handles_receipts_larger_than_sqlite_parameter_limits(outbox: Outbox) -> None:
    messages = [ack(n) for n in range(1200)]
    outbox.put_many([(TopicKind.ACKS, m, None, False) for m in messages])

    assert outbox.confirm(m.message_id for m in messages[:1100]) == 1100
    assert stored_ids(outbox) == [m.message_id for m in messages[1100:]]


def test_sent_entries_are_due_again_only_after_resend_after_s(outbox: Outbox) -> None:
    sent, fresh = telemetry(), telemetry()
    outbox.put(TopicKind.TELEMETRY, sent)
    (entry,) = outbox.due(10, resend_after_s=30, now=100.0)
    outbox.mark_sent([entry.seq], now=100.0)
    outbox.put(TopicKind.TELEMETRY, fresh)

    assert [e.message_id for e in outbox.due(10, resend_after_s=30, now=129.0)] == [
        fresh.message_id
    ]
    again = outbox.due(10, resend_after_s=30, now=130.0)
    assert [e.message_id for e in again] == [sent.message_id, fresh.message_id]
    assert again[0].attempts == 1
    assert again[1].attempts == 0


def test_a_retained_message_supersedes_older_ones_on_its_topic(outbox: Outbox) -> None:
    old = ReportedState(generation=1, applied=True)
    new = ReportedState(generation=2, applied=True)
    outbox.put(TopicKind.REPORTED, old, retain=True)
    outbox.put(TopicKind.ACKS, ack())
    outbox.put(TopicKind.REPORTED, new, retain=True)

    entries = everything(outbox)
    assert [e.kind for e in entries] == [TopicKind.ACKS, TopicKind.REPORTED]
    assert entries[1].message_id == new.message_id
    assert entries[1].retain
    assert outbox.dropped() == {}  # superseded, not dropped


def test_results_carry_their_model_and_only_results_may(outbox: Outbox) -> None:
    outbox.put(TopicKind.RESULTS, ack(), model="yolo")
    assert everything(outbox)[0].model == "yolo"
    with pytest.raises(ValueError, match="model name"):
        outbox.put(TopicKind.RESULTS, ack(1))
    with pytest.raises(ValueError, match="model name"):
        outbox.put(TopicKind.TELEMETRY, telemetry(), model="yolo")


def test_status_and_inbound_kinds_do_not_go_through_the_outbox(outbox: Outbox) -> None:
    for kind in (TopicKind.STATUS, TopicKind.COMMANDS, TopicKind.RECEIPTS, TopicKind.DESIRED):
        with pytest.raises(ValueError, match="do not go through the outbox"):
            outbox.put(kind, telemetry())
    assert outbox.depth() == 0


def test_a_message_over_the_protocol_limit_is_refused_not_stored(outbox: Outbox) -> None:
    huge = AckMessage(
        command_id="command-00000001",
        status=AckStatus.SUCCEEDED,
        result={f"k{n}": "x" * 1500 for n in range(60)},
    )
    assert len(huge.to_payload()) > MAX_PAYLOAD_BYTES
    with pytest.raises(PayloadTooLargeError, match="it was not stored"):
        outbox.put(TopicKind.ACKS, huge)
    assert outbox.depth() == 0


def test_the_message_bound_drops_oldest_telemetry_before_any_ack(tmp_path: Path) -> None:
    with Outbox.in_state_dir(tmp_path, max_messages=5) as outbox:
        old_telemetry = [telemetry() for _ in range(3)]
        acks = [ack(n) for n in range(4)]
        for message in old_telemetry:
            outbox.put(TopicKind.TELEMETRY, message)
        outbox.put(TopicKind.ACKS, acks[0])
        outbox.put(TopicKind.ACKS, acks[1])
        outbox.put(TopicKind.ACKS, acks[2])  # over the bound: the oldest telemetry goes
        outbox.put(TopicKind.ACKS, acks[3])  # and the next oldest

        assert stored_ids(outbox) == [
            old_telemetry[2].message_id,
            *(a.message_id for a in acks),
        ]
        assert outbox.dropped() == {"telemetry": 2}

        outbox.put(TopicKind.LOGS, log())  # logs outrank telemetry: the last one goes
        assert [e.kind for e in everything(outbox)] == [TopicKind.ACKS] * 4 + [TopicKind.LOGS]

        newest = telemetry()
        outbox.put(TopicKind.TELEMETRY, newest)  # everything stored matters more: dropped itself
        assert newest.message_id not in stored_ids(outbox)
        assert outbox.dropped() == {"telemetry": 4}

        later = [ack(9), ack(10)]
        outbox.put(TopicKind.ACKS, later[0])  # an ack displaces the log, then the oldest ack
        outbox.put(TopicKind.ACKS, later[1])
        assert stored_ids(outbox) == [a.message_id for a in (*acks[1:], *later)]
        assert outbox.dropped() == {"acks": 1, "logs": 1, "telemetry": 4}
        assert outbox.depth() == 5


def test_the_byte_bound_drops_as_many_low_priority_entries_as_needed(tmp_path: Path) -> None:
    logs = [log("x" * 1000) for _ in range(5)]
    size = len(logs[0].to_payload())
    with Outbox.in_state_dir(tmp_path, max_bytes=5 * size) as outbox:
        outbox.put_many([(TopicKind.LOGS, m, None, False) for m in logs])
        big_ack = AckMessage(
            command_id="command-00000001", status=AckStatus.SUCCEEDED, detail="y" * 1900
        )
        outbox.put(TopicKind.ACKS, big_ack)

        kept = stored_ids(outbox)
        assert kept[-1] == big_ack.message_id
        assert kept[:-1] == [m.message_id for m in logs[len(logs) - len(kept) + 1 :]]
        assert outbox.size_bytes() <= 5 * size
        assert outbox.dropped() == {"logs": len(logs) + 1 - len(kept)}

        too_big_for_bound = log("z" * (5 * size))
        outbox.put(TopicKind.LOGS, too_big_for_bound)  # could never fit: dropped, nothing else
        assert too_big_for_bound.message_id not in stored_ids(outbox)
        assert stored_ids(outbox) == kept


def test_drops_warn_once_per_burst(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="device_agent.outbox"),
        Outbox.in_state_dir(tmp_path, max_messages=2) as outbox,
    ):
        for _ in range(10):
            outbox.put(TopicKind.TELEMETRY, telemetry())
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "outbox full" in warnings[0].getMessage()

        outbox.confirm(stored_ids(outbox))
        outbox.put(TopicKind.TELEMETRY, telemetry())  # room again: the burst is over
        assert "room again after dropping 8 messages" in caplog.text
        for _ in range(3):
            outbox.put(TopicKind.TELEMETRY, telemetry())
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_entries_and_drop_counts_survive_reopening_and_are_all_due_again(tmp_path: Path) -> None:
    messages = [telemetry() for _ in range(4)]
    with Outbox.in_state_dir(tmp_path, max_messages=3) as outbox:
        for message in messages:
            outbox.put(TopicKind.TELEMETRY, message)
        sent = outbox.due(10, resend_after_s=30, now=1000.0)
        outbox.mark_sent([e.seq for e in sent], now=1000.0)
        assert outbox.due(10, resend_after_s=30, now=1000.0) == []

    with Outbox.in_state_dir(tmp_path, max_messages=3) as reopened:
        # A new run resends everything unconfirmed, whatever its clock says now.
        due = reopened.due(10, resend_after_s=30, now=0.0)
        assert [e.message_id for e in due] == [m.message_id for m in messages[1:]]
        assert [e.attempts for e in due] == [1, 1, 1]
        assert reopened.depth() == 3
        assert reopened.dropped() == {"telemetry": 1}
        later = telemetry()
        reopened.put(TopicKind.TELEMETRY, later)
        assert stored_ids(reopened)[-1] == later.message_id


def test_messages_put_by_a_process_killed_before_closing_are_all_there(tmp_path: Path) -> None:
    count = 50
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        from datetime import UTC, datetime
        from pathlib import Path
        from device_agent.outbox import Outbox
        from fleet_protocol import AckMessage, AckStatus, TopicKind

        outbox = Outbox.in_state_dir(Path(sys.argv[1]))
        for n in range({count}):
            outbox.put(
                TopicKind.ACKS,
                AckMessage(command_id=f"command-{{n:08d}}", status=AckStatus.RUNNING),
            )
        # Dies without closing anything, as a power cut or the OOM killer would leave it.
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == -9, result.stderr.decode()
    assert (tmp_path / OUTBOX_FILE).exists()

    with Outbox.in_state_dir(tmp_path) as outbox:
        entries = everything(outbox)
        assert outbox.depth() == count
        commands = [AckMessage.model_validate_json(e.payload).command_id for e in entries]
        assert commands == [f"command-{n:08d}" for n in range(count)]


def test_oldest_age_is_measured_from_the_oldest_message_timestamp(outbox: Outbox) -> None:
    created = datetime(2030, 1, 1, tzinfo=UTC)
    outbox.put(TopicKind.ACKS, ack().model_copy(update={"timestamp": created}))
    outbox.put(TopicKind.ACKS, ack(1))

    now = (created + timedelta(seconds=90)).timestamp()
    assert outbox.oldest_age_s(now) == pytest.approx(90.0)


def test_puts_from_many_threads_are_all_stored(outbox: Outbox) -> None:
    def put_some(worker: int) -> None:
        for n in range(25):
            outbox.put(TopicKind.ACKS, ack(worker * 1000 + n))

    threads = [threading.Thread(target=put_some, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outbox.depth() == 100
    assert len(set(stored_ids(outbox))) == 100


def test_a_damaged_file_is_reported_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / OUTBOX_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="move it aside"):
        Outbox.in_state_dir(tmp_path)


def test_a_closed_outbox_raises_outbox_errors(tmp_path: Path) -> None:
    outbox = Outbox.in_state_dir(tmp_path)
    outbox.close()
    outbox.close()
    with pytest.raises(OutboxError):
        outbox.put(TopicKind.ACKS, ack())
    with pytest.raises(OutboxError):
        outbox.due(1, resend_after_s=1, now=0)
