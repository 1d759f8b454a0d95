"""Cluster clients locate the keys of stream reads and scripts themselves
(``piopiy_voice.clusterkeys``): no ``COMMAND GETKEYS`` round trip per command."""

from __future__ import annotations

from piopiy_voice.clusterkeys import local_keys


def test_stream_reads_name_the_streams_after_STREAMS():
    assert local_keys(("XREAD", "COUNT", 50, "BLOCK", 10, "STREAMS", "a", "b", "0-0", "1-1")) == ["a", "b"]
    assert local_keys((b"XREADGROUP", b"GROUP", b"g", b"c", b"COUNT", 1, b"STREAMS", b"k", b">")) == [b"k"]
    # A stream named like the keyword is still a key: only the first STREAMS counts.
    assert local_keys(("XREAD", "STREAMS", "streams", "0-0")) == ["streams"]


def test_scripts_name_their_numkeys_keys():
    assert local_keys(("EVALSHA", "abc", 2, "k1", "k2", "arg")) == ["k1", "k2"]
    assert local_keys(("EVAL", "return 1", "0")) == []


def test_other_commands_are_left_to_redis_py():
    assert local_keys(("XADD", "k", "*", "f", "v")) is None
    assert local_keys(("XREAD", "COUNT", 1)) is None  # malformed: redis-py reports it
