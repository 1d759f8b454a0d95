"""``piopiy-voice status CALL_ID`` shows the call's final transcripts (text and --json)."""

import json

import fakeredis
import pytest

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.workers.dialer import cli


@pytest.fixture
def conn(monkeypatch):
    r = fakeredis.FakeRedis()
    monkeypatch.setattr(cli, "_redis", lambda: r)
    return r


def _say(r, cid, segment, text, final, channel="caller"):
    # As the transcriber role writes: every segment into the inbound stream,
    # finals also into the call's transcript stream (which outlives the audio).
    fields = c.encode(c.Transcript(call_id=cid, seq=0, segment=segment, text=text, final=final,
                                   channel=channel, start_ms=segment * 1000, end_ms=segment * 1000 + 800))
    r.xadd(keys.call_stream(cid), fields)
    if final:
        r.xadd(keys.call_transcript(cid), fields)


def test_status_lists_final_transcripts_in_order(conn, capsys):
    cid = "call-tx-1"
    conn.hset(keys.call_meta(cid), mapping={"state": "live"})
    conn.xadd(keys.call_transcript(cid), {"type": "noise", "x": "1"})  # other entries are skipped
    _say(conn, cid, 0, "hel", False)
    _say(conn, cid, 0, "hello there", True)
    _say(conn, cid, 1, "I need", False)
    _say(conn, cid, 1, "I need help", True, channel="conversation")

    status = cli.call_status(conn, cid)
    assert [(t["channel"], t["segment"], t["text"]) for t in status["transcript"]] == [
        ("caller", 0, "hello there"), ("conversation", 1, "I need help")]
    assert status["transcript"][1]["start_ms"] == 1000

    assert cli.status_main([cid]) == 0
    out = capsys.readouterr().out
    section = out.split("transcript:", 1)[1]
    assert "hello there" in section and "I need help" in section and "hel\n" not in section
    assert section.index("hello there") < section.index("I need help")

    assert cli.status_main([cid, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["text"] for t in data["transcript"]] == ["hello there", "I need help"]


def test_transcript_reads_past_one_batch(conn):
    cid = "call-tx-2"
    for i in range(7):
        _say(conn, cid, i, f"words {i}", True)
    assert [t["text"] for t in cli.call_transcript(conn, cid, batch=3)] == [f"words {i}" for i in range(7)]


def test_no_transcript_section_without_finals(conn, capsys):
    cid = "call-tx-3"
    conn.hset(keys.call_meta(cid), mapping={"state": "ended"})
    assert cli.status_main([cid]) == 0
    assert "transcript:" not in capsys.readouterr().out
