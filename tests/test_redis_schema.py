"""The Redis contract's key layout and message formats (no server needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from connectors.redis_schema import (
    Answer,
    Caption,
    Control,
    ControlReply,
    IngestState,
    Keys,
    Notification,
    Question,
    StreamInfo,
    StreamStatus,
    check_reply_to,
    decode_entry,
    encode_entry,
    encode_hash,
    safe_stream_id,
    window_entry_id,
)

from tests.support.records import RUN, make_caption, make_event


SAMPLES = [
    make_caption(3, latency_s=0.25),
    Answer(question_id="q1", stream="cam1", question="anyone?", window=3, text="Yes", probability=0.93),
    Answer(question_id="q2", error="unknown stream 'nope'"),
    Question(id="q1", stream="cam1", text="Is anyone in the loading bay?", kind="yesno", reply_to="sfs:reply:{q1}"),
    StreamStatus(
        stream="cam1",
        state=IngestState.RECONNECTING,
        fps_in=3.9,
        lag_s=0.4,
        windows_skipped=2,
        last_error="connection refused",
    ),
    make_event(3),
    StreamInfo(id="cam1", source="rtsp://cam/1", live=True, config={"fps": 4}, run=RUN),
    Control(action="add", stream="cam2", source="rtsp://u:p@cam/2", live=True, config={"stride": 8}),
    ControlReply(request_id="r1", stream="cam2", action="add"),
    Notification(kind="caption", stream="cam1", window=3, entry_id="1-0"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_entry_round_trip(msg) -> None:
    fields = encode_entry(msg)
    assert list(fields) == ["data"] and isinstance(fields["data"], str)
    assert decode_entry(type(msg), fields) == msg


def test_hash_has_data_and_flat_copies() -> None:
    c = make_caption(2, text="a person walks")
    fields = encode_hash(c, ("window", "text", "latency_s"))
    assert fields["window"] == "2" and fields["text"] == "a person walks" and fields["latency_s"] == ""
    assert decode_entry(Caption, fields) == c


def test_keys_share_a_hash_tag_per_stream() -> None:
    k = Keys()
    assert k.captions("cam1") == "sfs:{cam1}:captions"
    assert {key.split("}")[0] for key in k.per_stream("cam1")} == {"sfs:{cam1"}
    assert k.registry == "sfs:streams" and k.questions == "sfs:questions" and k.control == "sfs:control"
    assert k.reply("q1") == "sfs:reply:{q1}" and k.done("q1") == "sfs:answer:{q1}"
    assert Keys("t1").state("x") == "t1:{x}:state"


def test_entry_ids_follow_run_and_window() -> None:
    assert make_caption(5).entry_id == window_entry_id(RUN, 5) == f"{RUN + 5}-0"
    assert window_entry_id(RUN, 5, 2) == f"{RUN + 5}-2"


@pytest.mark.parametrize("bad", ["", "a b", "a{b}", "a:b", "-x", "x" * 65, "cam*"])
def test_bad_stream_ids_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="stream id"):
        Question(stream=bad, text="hi")


def test_safe_stream_id() -> None:
    assert safe_stream_id("my clip (1).mp4") == "my-clip--1-.mp4"
    assert safe_stream_id("{}") == "stream"
    assert safe_stream_id("café") == "caf"
    assert safe_stream_id("x" * 100) == "x" * 64


def test_question_limits() -> None:
    with pytest.raises(ValidationError):
        Question(stream="cam1", text="")
    with pytest.raises(ValidationError):
        Question(stream="cam1", text="x" * 2001)
    with pytest.raises(ValidationError):
        Question(stream="cam1", text="hi", id="has space")
    with pytest.raises(ValidationError):
        Question.model_validate_json('{"stream": "cam1", "text": "hi", "extra": 1}')


def test_reply_to_must_stay_under_reply_prefix() -> None:
    k = Keys()
    assert check_reply_to(k, "sfs:reply:{abc}") == "sfs:reply:{abc}"
    for bad in ("sfs:streams", "other", "sfs:reply:" + "x" * 300, "sfs:reply:a b"):
        with pytest.raises(ValueError):
            check_reply_to(k, bad)


def test_registry_masks_credentials() -> None:
    info = StreamInfo(
        id="cam1",
        source="rtsp://admin:hunter2@10.0.0.5/live?token=abc",
        config={"source": "rtsp://admin:hunter2@10.0.0.5/live", "fps": 4},
    )
    assert "hunter2" not in info.to_json() and "abc" not in info.source
    assert info.source.startswith("rtsp://admin:***@10.0.0.5/live")
