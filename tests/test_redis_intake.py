"""Question and control intake against a real redis-server: consumer groups, reclaim,
dead-letter, exactly one reply, malformed input."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import redis

from connectors.intake import ControlIntake, QuestionIntake
from connectors.publisher import Publisher
from connectors.redis_conn import connect
from connectors.redis_schema import (
    Answer,
    Control,
    ControlReply,
    InvalidMessage,
    Keys,
    Question,
    StreamInfo,
    encode_entry,
)

K = Keys()


@pytest.fixture
def r(redis_url: str):
    client = connect(redis_url)
    with Publisher(redis_url) as pub:
        pub.register_stream(StreamInfo(id="cam1", source="file:///clip.mp4", live=False))
    yield client
    client.close()


def ask_raw(r, **fields: object) -> str:
    return r.xadd(K.questions, encode_entry(Question(**fields)))  # type: ignore[arg-type]


def replies(r, key: str) -> list[dict]:
    return [json.loads(x) for x in r.lrange(key, 0, -1)]


def test_two_consumers_share_the_group_and_each_question_gets_one_reply(redis_url: str, r) -> None:
    a = QuestionIntake(redis_url, "worker-a")
    b = QuestionIntake(redis_url, "worker-b")
    entry_ids = [ask_raw(r, stream="cam1", text=f"question {i}") for i in range(6)]
    got_a = a.poll(block_ms=200, count=3)
    got_b = b.poll(block_ms=200, count=10)
    assert len(got_a) == 3 and len(got_b) == 3
    assert sorted(e for e, _ in got_a + got_b) == sorted(entry_ids)  # each delivered to one consumer
    for intake, got in ((a, got_a), (b, got_b)):
        for entry_id, q in got:
            assert isinstance(q, Question) and q.id == entry_id and q.reply_to == K.reply(entry_id)
            assert intake.complete(entry_id, q, Answer(question_id=q.id, stream=q.stream, text="yes"))
    assert a.pending() == 0
    for entry_id in entry_ids:
        assert [x["text"] for x in replies(r, K.reply(entry_id))] == ["yes"]
    assert a.poll(block_ms=50) == [] and b.poll(block_ms=50) == []


def test_stuck_question_is_reclaimed_and_replied_once(redis_url: str, r) -> None:
    a = QuestionIntake(redis_url, "worker-a")
    b = QuestionIntake(redis_url, "worker-b", min_idle_ms=600_000)
    entry_id = ask_raw(r, stream="cam1", text="anyone there?")
    [(_, q_a)] = a.poll(block_ms=200)  # worker a takes it, then hangs (no ack)
    assert b.reclaim() == []  # not idle long enough yet (10 minutes, however slow the machine)
    time.sleep(0.02)
    [(claimed_id, q_b)] = b.reclaim(min_idle_ms=10)  # as if its min_idle_ms had passed
    assert claimed_id == entry_id and q_b == q_a and b.stats.reclaimed == 1
    assert b.complete(claimed_id, q_b, Answer(question_id=q_b.id, text="from b"))
    # worker a wakes up late: its reply is refused, its ack is harmless
    assert not a.complete(entry_id, q_a, Answer(question_id=q_a.id, text="from a"))
    assert [x["text"] for x in replies(r, q_a.reply_to)] == ["from b"]
    assert a.pending() == 0


def test_redelivery_after_reply_is_acked_without_work(redis_url: str, r) -> None:
    a = QuestionIntake(redis_url, "worker-a")
    b = QuestionIntake(redis_url, "worker-b")
    ask_raw(r, stream="cam1", text="anyone?")
    [(entry_id, q)] = a.poll(block_ms=200)
    assert a.reply(q, Answer(question_id=q.id, text="yes"))  # crash before ack
    time.sleep(0.02)
    assert b.reclaim(min_idle_ms=10) == []
    assert b.stats.already_replied == 1 and b.pending() == 0


def test_dead_letter_after_max_deliveries(redis_url: str, r) -> None:
    worker = QuestionIntake(redis_url, "worker", max_deliveries=2)
    entry_id = ask_raw(r, stream="cam1", text="poison")
    assert len(worker.poll(block_ms=200)) == 1  # delivery 1
    time.sleep(0.01)
    assert len(worker.reclaim(min_idle_ms=5)) == 1  # delivery 2
    time.sleep(0.01)
    assert worker.reclaim(min_idle_ms=5) == []  # would be delivery 3: dead-lettered
    assert worker.stats.dead_lettered == 1 and worker.pending() == 0
    [reply] = replies(r, K.reply(entry_id))
    assert "2 deliveries" in reply["error"]
    [(_, dead)] = r.xrange(K.dead(K.questions))
    assert dead["entry_id"] == entry_id and dead["deliveries"] == "3" and "poison" in dead["data"]


def test_malformed_messages_get_error_replies_and_never_block(redis_url: str, r, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = {
        "bad json": {"data": '{"stream": "cam1", "text": '},
        "not json at all": {"data": f"__import__('pathlib').Path({str(marker)!r}).touch()"},
        "pickle": {"data": pickle.dumps(Evil()).hex()},
        "missing text": {"data": json.dumps({"stream": "cam1", "id": "q-missing", "reply_to": "sfs:reply:{mine}"})},
        "no data field": {"stream": "cam1", "text": "hi"},
        "oversize": {"data": json.dumps({"stream": "cam1", "text": "x" * 20_000})},
        "unknown stream": {"data": json.dumps({"stream": "nope", "text": "hi"})},
        "bad stream id": {"data": json.dumps({"stream": "a{b}", "text": "hi"})},
        "unsafe reply_to": {"data": json.dumps({"stream": "cam1", "text": "hi", "reply_to": "sfs:streams"})},
    }
    ids = {name: r.xadd(K.questions, fields) for name, fields in bad.items()}
    raw = redis.Redis.from_url(redis_url)  # bytes in, bytes out
    ids["not utf-8"] = raw.xadd(K.questions, {b"data": b'{"stream": "cam1", "text": "\xff\xfe"'}).decode()
    bad["not utf-8"] = {}
    good = ask_raw(r, stream="cam1", text="a fine question")

    intake = QuestionIntake(redis_url, "worker")
    got = intake.poll(block_ms=200, count=50)
    valid = [(e, m) for e, m in got if isinstance(m, Question)]
    assert [e for e, _ in valid] == [good]  # the good one still comes through, in the same poll
    invalid = {e: m for e, m in got if isinstance(m, InvalidMessage)}
    assert len(invalid) == len(bad) and intake.stats.invalid == len(bad)
    assert intake.pending() == 1  # every malformed entry is acked; only the good one waits

    # the error reply lands where the asker waits: its reply_to if readable and safe, else by entry id
    assert "text" in replies(r, "sfs:reply:{mine}")[0]["error"]
    for name, entry_id in ids.items():
        if name == "missing text":
            continue
        [reply] = replies(r, K.reply(entry_id))
        assert reply["error"], name
    assert "unknown stream 'nope'" in replies(r, K.reply(ids["unknown stream"]))[0]["error"]
    assert "too large" in replies(r, K.reply(ids["oversize"]))[0]["error"]
    assert not r.exists("sfs:streams") or r.type("sfs:streams") == "hash"  # reply never written there
    assert r.xlen(K.dead(K.questions)) == len(bad)
    assert not marker.exists()  # nothing was unpickled or evaluated


def test_control_intake(redis_url: str, r) -> None:
    controller = ControlIntake(redis_url, "supervisor")
    add = r.xadd(K.control, encode_entry(Control(action="add", stream="cam2", source="rtsp://u:p@cam/2")))
    no_source = r.xadd(K.control, encode_entry(Control(action="add", stream="cam3")))
    got = controller.poll(block_ms=200)
    [(entry_id, msg)] = [(e, m) for e, m in got if isinstance(m, Control)]
    assert entry_id == add and msg.source == "rtsp://u:p@cam/2"
    assert controller.complete(entry_id, msg)
    assert ControlReply.model_validate_json(r.lpop(K.reply(add))).ok
    assert "source" in ControlReply.model_validate_json(r.lpop(K.reply(no_source))).error


def test_control_messages_given_up_on_go_to_the_control_dead_letter_stream(redis_url: str, r) -> None:
    """A malformed control message, one that cannot work (add without a source) and one whose
    handler never acknowledges it (a driver that crashes on it) end in `sfs:control:dead`, each
    with an error reply; the intake goes on."""
    assert K.dead(K.control) == "sfs:control:dead"
    worker = ControlIntake(redis_url, "supervisor", max_deliveries=2)
    malformed = r.xadd(K.control, {"data": '{"action": "add", "stream": '})
    no_source = r.xadd(K.control, encode_entry(Control(action="add", stream="cam3")))
    poison = r.xadd(K.control, encode_entry(Control(action="remove", stream="cam1")))
    got = worker.poll(block_ms=200)  # delivery 1 of the poison message, never acknowledged
    assert [e for e, m in got if isinstance(m, Control)] == [poison]
    time.sleep(0.02)
    assert [e for e, _ in worker.reclaim(min_idle_ms=10)] == [poison]  # delivery 2
    time.sleep(0.02)
    assert worker.reclaim(min_idle_ms=10) == []  # would be delivery 3: given up on
    assert worker.stats.dead_lettered == 1 and worker.pending() == 0
    dead = {fields["entry_id"]: fields for _, fields in r.xrange(K.dead(K.control))}
    assert set(dead) == {malformed, no_source, poison} and dead[poison]["deliveries"] == "3"
    assert "2 deliveries" in ControlReply.model_validate_json(r.lpop(K.reply(poison))).error
    assert "source" in ControlReply.model_validate_json(r.lpop(K.reply(no_source))).error
    assert ControlReply.model_validate_json(r.lpop(K.reply(malformed))).error
    later = r.xadd(K.control, encode_entry(Control(action="remove", stream="cam1")))
    assert [e for e, _ in worker.poll(block_ms=200)] == [later]
