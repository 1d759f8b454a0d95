"""The gateway on a Redis Cluster: the writer routing each entry to its slot's
primary (``gateway/cluster_route.py``).

The first half needs no server (slot math, reply parsing, per-primary
buffers, redirect handling fed with crafted replies); the second half runs on
the local cluster of ``tests/cluster_support.py`` (fixture ``redis_cluster``):
many calls, a slot migrated mid-stream, a primary killed (SIGKILL) or stopped
(SIGSTOP) mid-call, a manual failover, the gateway process itself (command
reader, resume scripts, heartbeat) on the cluster and through a primary kill,
and a TLS-only cluster with a password (``rediss+cluster://``).
"""

from __future__ import annotations

import asyncio
import time

import hiredis
import pytest
from redis.crc import key_slot

from piopiy_voice import callrecord, keys
from piopiy_voice.gateway import cluster_route as cr
from piopiy_voice.gateway.publisher import Publisher

PCM = b"\x01\x00" * 160
SEEDS = "redis+cluster://127.0.0.1:7001,127.0.0.1:7002"


# ------------------------------------------------------------ no server
def test_a_cluster_url_gets_the_routing_writer_and_a_plain_one_does_not():
    assert type(Publisher(SEEDS)) is cr.ClusterPublisher
    assert type(Publisher("redis://127.0.0.1:7001/0")) is Publisher


def test_rediss_cluster_urls_get_the_verifying_tls_context():
    import ssl  # noqa: PLC0415

    from piopiy_voice.redisconn import RedisTls  # noqa: PLC0415

    pub = Publisher("rediss+cluster://:pw@127.0.0.1:7001,127.0.0.1:7002", tls=RedisTls())
    assert isinstance(pub._ssl, ssl.SSLContext) and pub._ssl.verify_mode == ssl.CERT_REQUIRED
    assert pub._seeds == [("127.0.0.1", 7001), ("127.0.0.1", 7002)] and pub._auth == (None, "pw")
    assert Publisher(SEEDS)._ssl is None


def test_slot_of_a_command_is_redis_pys_and_one_per_call():
    cid = "call-slot"
    slot = key_slot(keys.call_stream(cid).encode())
    for key in keys.call_keys(cid):
        assert cr.command_slot(["XADD", key, "*", "a", "1"]) == slot
    assert cr.command_slot(["EVAL", "return 1", 2, keys.call_meta(cid), keys.call_timeline(cid),
                            "arg"]) == slot
    assert cr.command_slot(["ZADD", callrecord.SUSPENDED_ZSET, 1, cid]) == \
        key_slot(callrecord.SUSPENDED_ZSET.encode())
    assert cr.command_slot(["PING"]) == 0


def test_a_script_whose_keys_span_two_slots_is_refused_when_queued():
    pub = Publisher(SEEDS)
    with pytest.raises(ValueError, match="span 2 cluster slots"):
        pub.command("EVAL", "return 1", 2, keys.call_meta("a"), keys.call_meta("b"))
    assert pub._pending == 0


def test_redirect_errors_are_parsed():
    assert cr.parse_redirect("MOVED 3999 127.0.0.1:6381", "h") == ("MOVED", 3999, ("127.0.0.1", 6381))
    assert cr.parse_redirect("ASK 1 10.0.0.2:7000", "h") == ("ASK", 1, ("10.0.0.2", 7000))
    assert cr.parse_redirect("MOVED 7 :7000", "10.1.1.1") == ("MOVED", 7, ("10.1.1.1", 7000))
    assert cr.parse_redirect("MOVED 7 ::1:7000", "h") == ("MOVED", 7, ("::1", 7000))
    assert cr.parse_redirect("OOM command not allowed", "h") is None
    assert cr.parse_redirect("MOVED x y:z", "h") is None


def test_cluster_slots_reply_is_parsed():
    reply = [
        [0, 5460, [b"127.0.0.1", 7001, b"id1", []], [b"127.0.0.1", 7004, b"id4", []]],
        [5461, 10922, [b"", 7002, b"id2"]],
        [10923, 16383, [b"?", 7003, b"id3"]],
    ]
    ranges, replicas = cr.parse_slots(reply, "10.0.0.9")
    assert ranges == [(0, 5460, ("127.0.0.1", 7001)), (5461, 10922, ("10.0.0.9", 7002))]
    assert replicas == [("127.0.0.1", 7004)]
    table = cr.slot_owners([(0, 1, "a"), (3, 3, "b")])
    assert table[:5] == ["a", "a", None, "b", None] and len(table) == cr.SLOTS


def test_commands_split_back_out_of_a_buffer_with_the_audio_prefix():
    pub = Publisher(SEEDS)
    prefix = pub.audio_prefix("call-split")
    buf = bytearray(cr.resp("HSET", "k", "f", "v"))
    pub_single = Publisher("redis://127.0.0.1:1/0")
    assert pub_single.add_audio(pub_single.audio_prefix("call-split"), 42, PCM)
    buf += pub_single._buf
    buf += cr.resp("PING")
    cmds = cr.split_commands(buf)
    assert len(cmds) == 3 and cmds[-1][1] == len(buf)
    start, end, prefix_end = cmds[1]
    assert bytes(buf[start:prefix_end]) == prefix
    assert hiredis_args(bytes(buf[start:end]))[-3:] == [b"42", b"pcm", PCM]


def _topology(pub: cr.ClusterPublisher, n: int = 3) -> list[cr._Node]:
    """Three fake primaries splitting the slots evenly (no task is started)."""
    step = cr.SLOTS // n
    ranges = [(i * step, cr.SLOTS - 1 if i == n - 1 else (i + 1) * step - 1, ("10.0.0.1", 7001 + i))
              for i in range(n)]
    pub._apply(ranges)
    return [pub._nodes[("10.0.0.1", 7001 + i)] for i in range(n)]


def _keys_of(buf: bytes) -> list[bytes]:
    return [hiredis_args(cmd)[1] for cmd in _cmds(buf)]


def _seq_of(buf: bytes) -> list[int]:
    return [int(hiredis_args(cmd)[-3]) for cmd in _cmds(buf)]


def test_entries_are_buffered_per_primary_by_slot():
    pub = Publisher(SEEDS, buffer_frames=10_000)
    nodes = _topology(pub)
    calls = [f"call-{i}" for i in range(60)]
    prefixes = {cid: pub.audio_prefix(cid) for cid in calls}
    for seq in range(1, 4):
        for cid in calls:
            assert pub.add_audio(prefixes[cid], seq, PCM)
    pub.xadd(keys.CALLS_STREAM, {"type": "call.started"})
    assert pub.frames == 180 and pub._pending == 181 and pub.pending_frames == 180
    total = 0
    for node in nodes:
        assert node.kinds, "calls spread over every primary"
        ks = _keys_of(node.buf)
        assert len(ks) == len(node.kinds)
        assert all(pub._owner[key_slot(k)] is node for k in ks)
        for cid, prefix in prefixes.items():  # a call's frames, in order, on its slot's primary
            if pub._owner[key_slot(keys.call_stream(cid).encode())] is node:
                assert node.per_call[prefix] == 3
        batch, kinds, per_call, frames = pub._take(node)
        assert frames == sum(kinds) == 3 * len(per_call)
        total += len(kinds)
    assert total == 181 and pub.frames == 0 and pub._pending == 0


def test_buffer_and_per_call_limits_hold_in_cluster_mode():
    pub = Publisher(SEEDS, buffer_frames=100, call_frames=10)
    a, b = pub.audio_prefix("call-a"), pub.audio_prefix("call-b")
    assert all(pub.add_audio(a, s, PCM) for s in range(10))  # no topology yet: held aside
    assert not pub.add_audio(a, 11, PCM) and not pub.room_for(a)
    assert pub.room_for(b) and pub.add_audio(b, 1, PCM)
    assert pub.full_for(a) == "redis_unavailable"  # not connected
    assert pub.has_room and pub.pending_frames == 11 and len(pub._nowhere.kinds) == 11
    nodes = _topology(pub)  # the first topology routes what waited
    assert not pub._nowhere.kinds and sum(len(n.kinds) for n in nodes) == 11
    assert not pub.room_for(a) and pub.frames == 11


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def _replies(*items: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(items))
    return reader


def test_moved_ask_tryagain_and_rejections_each_go_their_way():
    async def main():
        pub = Publisher(SEEDS)
        nodes = _topology(pub)
        cid = "call-redirect"
        prefix = pub.audio_prefix(cid)
        slot = key_slot(keys.call_stream(cid).encode())
        src = pub._owner[slot]
        dst = next(n for n in nodes if n is not src)
        for seq in range(1, 6):
            pub.add_audio(prefix, seq, PCM)
        batch, kinds, per_call, frames = pub._take(src)
        pub.add_audio(prefix, 6, PCM)  # newer, buffered while the batch is out
        moved = b"-MOVED %d %s:%d\r\n" % (slot, dst.addr[0].encode(), dst.addr[1])
        ask = b"-ASK %d %s:%d\r\n" % (slot, dst.addr[0].encode(), dst.addr[1])
        # seq 1 written, 2 ASK, 3 rejected (OOM), 4 and 5 MOVED
        reader = _replies(b"+1-0\r\n", ask, b"-OOM no memory\r\n", moved, moved)
        assert await pub._send(src, reader, _Sink(), [], batch, kinds, per_call, frames, False)
        c = pub.metrics.c
        assert (c["frames_published"], c["frames_rejected"], c["redis_moved"], c["redis_ask"]) == \
            (1, 1, 2, 1)
        assert pub._owner[slot] is dst and not src.kinds
        # MOVED ones back in front of the new owner's buffer, the newer one behind them
        assert _seq_of(dst.buf) == [4, 5, 6] and dst.per_call == {prefix: 3} and pub.frames == 3
        # the ASK one waits on the target, to go behind ASKING before its batch
        assert [int(hiredis_args(cmd)[-3]) for cmd, _k in dst.asks] == [2]
        assert pub._pending == 4
        asks, dst.asks = dst.asks, []
        batch, kinds, per_call, frames = pub._take(dst)
        sink = _Sink()
        ok = await pub._send(dst, _replies(b"+OK\r\n", b"+2-0\r\n", b"+4-0\r\n", b"+5-0\r\n",
                                           b"-TRYAGAIN x\r\n"), sink, asks, batch, kinds, per_call, frames,
                             False)
        assert not ok  # TRYAGAIN: the node pauses before its next batch
        assert sink.data.startswith(cr.resp("ASKING"))
        assert _seq_of(dst.buf) == [6] and pub._pending == 1
        assert c["redis_retried"] == 1 and c["frames_published"] == 4

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_batch_refused_whole_during_a_failover_goes_back_as_it_was():
    async def main():
        pub = Publisher(SEEDS)
        _topology(pub)
        prefix = pub.audio_prefix("call-down")
        for seq in (1, 2, 3):
            pub.add_audio(prefix, seq, PCM)
        node = pub._route[prefix]
        batch, kinds, per_call, frames = pub._take(node)
        pub.add_audio(prefix, 4, PCM)
        down = b"-CLUSTERDOWN The cluster is down\r\n"
        assert not await pub._send(node, _replies(down, down, down), _Sink(), [], batch, kinds,
                                   per_call, frames, False)
        assert _seq_of(node.buf) == [1, 2, 3, 4] and node.per_call == {prefix: 4}
        assert pub.frames == 4 and pub.metrics.c["redis_retried"] == 3
        assert pub.metrics.c["frames_published"] == 0 and pub._refresh.is_set()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_batch_without_answer_goes_back_in_front_in_order():
    pub = Publisher(SEEDS)
    _topology(pub)
    prefix = pub.audio_prefix("call-back")
    for seq in (1, 2):
        pub.add_audio(prefix, seq, PCM)
    node = pub._route[prefix]
    batch, kinds, per_call, frames = pub._take(node)
    pub.add_audio(prefix, 3, PCM)  # newer, arrived while the batch was out
    pub._put_back(node, [], batch, kinds, per_call, frames)
    assert _seq_of(node.buf) == [1, 2, 3]
    assert node.per_call == {prefix: 3} and pub.frames == 3


def test_a_topology_change_moves_buffered_entries_to_the_new_primary():
    pub = Publisher(SEEDS)
    nodes = _topology(pub)
    prefixes = [pub.audio_prefix(f"call-m{i}") for i in range(20)]
    for seq in (1, 2):
        for p in prefixes:
            pub.add_audio(p, seq, PCM)
    pub.hset(keys.call_meta("call-m0"), "state", "live")
    # every slot now belongs to one promoted replica
    pub._apply([(0, cr.SLOTS - 1, ("10.0.0.2", 7009))])
    new = pub._nodes[("10.0.0.2", 7009)]
    assert len(new.kinds) == 41 and pub.frames == 40 and sum(new.per_call.values()) == 40
    assert all(n.retired and not n.kinds for n in nodes) and list(pub._nodes) == [new.addr]
    for p in prefixes:  # each call's entries still in order
        seqs = [int(hiredis_args(c_)[-3]) for c_ in _cmds(new.buf) if c_.startswith(p)]
        assert seqs == [1, 2]
    assert pub._route.get(prefixes[0]) is None and pub.room_for(prefixes[0])


class _TurningNode:
    """A one-node cluster on loopback speaking RESP whose state turns from
    down to ok partway through what it is sent: it answers ``CLUSTERDOWN`` to
    the first ``refuse`` XADDs, then writes. A batch that straddles the turn
    is what a real node does when its failover ends while it reads a big
    batch in 16 KB pieces (``cluster_route``: probing)."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.written: list[tuple[bytes, int]] = []  # (key, seq) in the order stored
        self.writes: list[int] = []  # XADDs per read of a connection

    async def serve(self, reader, writer):
        rd = hiredis.Reader()
        while data := await reader.read(1 << 16):
            rd.feed(data)
            out, xadds = [], 0
            while (cmd := rd.gets()) is not False:
                name = cmd[0].upper()
                if name == b"PING":
                    out.append(b"+PONG\r\n")
                elif name == b"CLUSTER":
                    port = str(self.port).encode()
                    out.append(b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:%s\r\n"
                               b"$2\r\nn1\r\n" % port)
                elif name == b"XADD":
                    xadds += 1
                    if self.refuse > 0:
                        self.refuse -= 1
                        out.append(b"-CLUSTERDOWN The cluster is down\r\n")
                    else:
                        self.written.append((cmd[1], int(cmd[-3])))
                        out.append(b"$3\r\n1-1\r\n")
                else:
                    out.append(b"+OK\r\n")
            if xadds:
                self.writes.append(xadds)
            writer.write(b"".join(out))
        writer.close()

    async def start(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


def test_a_node_turning_from_down_to_ok_inside_a_batch_reorders_nothing():
    """Ten frames buffered before the writer connects (a backlog, as after a
    failover); the node refuses the first twelve XADDs it reads: the first
    batch whole, then it turns ok. Without probing the ten are resent as one
    batch that straddles the turn: 3..10 written, 1..2 resent behind them.
    With it the writer sends one at a time until one is written, then the rest."""
    async def main():
        node = await _TurningNode(refuse=12).start()
        pub = Publisher(f"redis+cluster://127.0.0.1:{node.port}")
        prefix = pub.audio_prefix("call-turn")
        for seq in range(1, 11):
            assert pub.add_audio(prefix, seq, PCM)
        pub.start()
        assert await pub.flush(10)
        await pub.close()
        node.server.close()
        return node, pub.metrics.c

    node, c = asyncio.run(asyncio.wait_for(main(), 20))
    assert [seq for _k, seq in node.written] == list(range(1, 11))
    assert c["frames_published"] == 10 and c["redis_retried"] == 12
    # the first batch refused whole, two refused probes of one, the probe that
    # got through, then the rest as one batch
    assert node.writes == [10, 1, 1, 1, 9], node.writes


def _cmds(buf: bytes) -> list[bytes]:
    return [bytes(buf[s:e]) for s, e, _ in cr.split_commands(buf)]


def hiredis_args(cmd: bytes) -> list[bytes]:
    r = hiredis.Reader()
    r.feed(cmd)
    return r.gets()


# ------------------------------------------------------- on a real cluster
def _seqs(client, cid):
    return [int(f[b"seq"]) for _, f in client.xrange(keys.call_stream(cid)) if f.get(b"type") == b"audio"]


def _consumed(seqs):
    """What a consumer keeps of a stream's seqs: it drops any seq not above the
    highest seen. A batch resent after its connection died mid-reply (written,
    answer lost) appears twice; that must be the only kind of repeat."""
    kept, top = [], 0
    for s in seqs:
        if s > top:
            kept.append(s)
            top = s
    assert set(kept) == set(seqs), "an entry out of order, not a replay"
    return kept


def _primaries(rc):
    """port -> node id of the cluster's primaries, from a node's CLUSTER NODES."""
    out = {}
    for addr, info in rc.cluster_nodes().items():
        if "master" in info["flags"] and "fail" not in info["flags"] and info["slots"]:
            out[int(addr.rsplit(":", 1)[1].split("@")[0])] = info["node_id"]
    return out


async def _until_connected(pub, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pub.connected:
        assert time.monotonic() < deadline, f"writer not connected: {pub.last_error}"
        await asyncio.sleep(0.01)


def _node(port):
    import redis  # noqa: PLC0415

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


@pytest.mark.integration
def test_frames_of_many_calls_land_in_their_call_streams_in_order(redis_cluster, rc):
    from piopiy_voice.gateway import resume  # noqa: PLC0415

    calls = [f"many-{i}" for i in range(60)]

    async def main():
        pub = Publisher(redis_cluster.url)
        pub.start()
        prefixes = {cid: pub.audio_prefix(cid) for cid in calls}
        for cid in calls:
            callrecord.set_state(pub, cid, "live", gateway_id="gw-c")
            pub.xadd(keys.CALLS_STREAM, {"type": "call.started", "call_id": cid})
        for seq in range(1, 101):
            for cid in calls:
                assert pub.add_audio(prefixes[cid], seq, PCM)
        for cid in calls:  # a script over two of the call's keys, through the writer
            resume.suspend(pub, cid, "gw-c", now=1.0, resume_by=2.0, last_seq=100, frames_in=100,
                           frames_dropped=0, why="test")
        assert await pub.flush(15)
        assert pub.connected and not pub.last_error
        n_nodes = len(pub._nodes)
        await pub.close()
        return pub.metrics.c, n_nodes

    c, n_nodes = asyncio.run(asyncio.wait_for(main(), 30))
    assert c["frames_published"] == 6000 and c["redis_rejected"] == 0
    ports = {redis_cluster.primary_port_for(keys.call_stream(cid)) for cid in calls}
    assert n_nodes == len(ports) >= 3  # every primary got its share, on its own connection
    for cid in calls:
        assert _seqs(rc, cid) == list(range(1, 101)), cid
        assert rc.hget(keys.call_meta(cid), "state") == b"suspended"
        assert rc.zscore(callrecord.SUSPENDED_ZSET, cid) == 2.0
    assert rc.xlen(keys.CALLS_STREAM) == 60


@pytest.mark.integration
def test_a_slot_migrated_mid_stream_loses_and_reorders_nothing(redis_cluster, rc):
    cid = "migrating-call"
    key = keys.call_stream(cid)
    slot = key_slot(key.encode())
    primaries = _primaries(rc)
    src = redis_cluster.primary_port_for(key)
    dst = next(p for p in primaries if p != src)
    S, D = _node(src), _node(dst)

    async def main():
        pub = Publisher(redis_cluster.url)
        pub.start()
        prefix = pub.audio_prefix(cid)
        stop = asyncio.Event()

        async def feed():
            seq = 0
            while not stop.is_set():
                seq += 1
                assert pub.add_audio(prefix, seq, PCM)
                if seq % 25 == 0:
                    pub.hset(keys.call_meta(cid), mapping={"last": seq})
                await asyncio.sleep(0.002)
            return seq

        feeder = asyncio.create_task(feed())
        await asyncio.sleep(0.3)
        D.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", primaries[src])
        S.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", primaries[dst])
        for k in S.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            S.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", k)
            await asyncio.sleep(0.15)  # writes meanwhile: ASK for the moved key
        await asyncio.sleep(0.2)
        for port in sorted(primaries, key=lambda p: p != dst):  # the target first
            _node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", primaries[dst])
        await asyncio.sleep(0.3)  # writes after: MOVED, then straight to the new owner
        stop.set()
        sent = await feeder
        assert await pub.flush(10)
        await pub.close()
        return sent, pub.metrics.c

    sent, c = asyncio.run(asyncio.wait_for(main(), 30))
    assert c["redis_ask"] > 0 and c["redis_moved"] > 0
    assert c["frames_published"] == sent and c["redis_rejected"] == 0
    assert redis_cluster.primary_port_for(key) == dst
    assert [int(f[b"seq"]) for _, f in D.xrange(key)] == list(range(1, sent + 1))
    assert int(D.hget(keys.call_meta(cid), "last")) == sent - sent % 25


@pytest.mark.integration
def test_a_primary_killed_mid_call_loses_only_what_was_metered(redis_cluster, rc):
    calls = [f"kill-{i}" for i in range(30)]
    per_call = 40  # frames a call may buffer (0.8 s): the outage (>= node timeout, 1 s) outlasts it

    victim = redis_cluster.primary_port_for(keys.call_stream(calls[0]))
    on_victim = {cid for cid in calls if redis_cluster.primary_port_for(keys.call_stream(cid)) == victim}

    async def main():
        pub = Publisher(redis_cluster.url, call_frames=per_call)
        pub.start()
        prefixes = {cid: pub.audio_prefix(cid) for cid in calls}
        await _until_connected(pub)
        refused = dict.fromkeys(calls, 0)
        killed_at = down_at = back_at = None
        seq = 0
        t0 = time.monotonic()
        # 20 ms frames, paced like a live call, until well after the failover
        while time.monotonic() - t0 < 30:
            seq += 1
            for cid in calls:
                if not pub.add_audio(prefixes[cid], seq, PCM):
                    refused[cid] += 1
            now = time.monotonic()
            if killed_at is None and now - t0 > 1.0:
                assert await asyncio.to_thread(redis_cluster.kill_primary_of,
                                               keys.call_stream(calls[0])) == victim
                killed_at = time.monotonic()
            elif killed_at is not None and back_at is None:
                if down_at is None and not pub.connected:
                    down_at = now
                elif down_at is not None and pub.connected:
                    back_at = now
            if back_at is not None and now - back_at > 1.0:
                break
            await asyncio.sleep(0.02)
        assert back_at is not None, "the writer never came back after the failover"
        assert await pub.flush(15)
        await pub.close()
        return pub.metrics.c, refused, seq, back_at - killed_at

    c, refused, last, recovery = asyncio.run(asyncio.wait_for(main(), 60))
    redis_cluster.wait_healthy(30)
    missing, replays = {}, 0
    for cid in calls:
        got = _seqs(rc, cid)
        kept = _consumed(got)
        missing[cid] = last - len(kept)
        replays += len(got) - len(kept)
    # Every frame missing from a stream is one the writer refused and counted
    # (the caller meters it as dropped). The one exception Redis allows: writes
    # the killed primary acknowledged but had not yet sent to its replica
    # (asynchronous replication), only on its own calls and at most the tail of
    # one batch; on loopback the replica nearly always has them already.
    unaccounted = {cid: missing[cid] - refused[cid] for cid in calls}
    assert all(v == 0 for cid, v in unaccounted.items() if cid not in on_victim), unaccounted
    assert all(0 <= v <= per_call for v in unaccounted.values()), unaccounted
    lost = sum(refused.values())
    print(f"\nprimary {victim} killed: writer connected again after {recovery:.2f}s; "
          f"{lost} frames refused (metered) over {sum(1 for v in refused.values() if v)} calls, "
          f"{sum(unaccounted.values())} unaccounted (acknowledged, not replicated); {replays} "
          f"replayed (resent, dropped by seq); retried {c['redis_retried']}, "
          f"topology reads {c['redis_topology']}")
    assert c["frames_published"] == 30 * last - lost
    assert lost > 0


@pytest.mark.integration
def test_the_gateway_process_runs_on_the_cluster(redis_cluster, rc):
    """Sockets, the command reader, the resume scripts (claim, suspend, the
    sweeper's end), the heartbeat's pipeline: all of it against the cluster."""
    from websockets.asyncio.client import connect as ws_connect  # noqa: PLC0415

    from piopiy_voice import contracts as c  # noqa: PLC0415
    from test_fault_gateway_reconnect import command_reaches_socket, rst  # noqa: PLC0415
    from test_gateway_server import GW, running, url  # noqa: PLC0415

    def stream(cid):
        return [c.decode(f) for _, f in rc.xrange(keys.call_stream(cid))]

    async def until(pred, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    def state(cid):
        return (rc.hget(keys.call_meta(cid), "state") or b"").decode()

    def audio(cid):
        return [m for m in stream(cid) if m.type == "audio"]

    async def scenario():
        async with running(redis_cluster.url, reconnect_grace_s=1.0) as (gw, client):
            assert type(gw.publisher) is cr.ClusterPublisher
            await until(lambda: gw._writer_state()[0], "writer ready")
            u = url(gw, "cl-a", campaign="spring")
            ws = await ws_connect(u, compression=None)
            for _ in range(50):
                await ws.send(bytes(320))
            await until(lambda: len(audio("cl-a")) == 50, "50 frames")
            # the command reader (XREAD on the gateway's stream) and the result
            assert await command_reaches_socket(client, "cl-a", ws, "hello cluster") == GW
            await until(lambda: any(m.type == "command.result" for m in stream("cl-a")), "result")
            rst(ws)  # dropped: suspended by a script through the writer
            await until(lambda: state("cl-a") == "suspended", "suspended")
            assert rc.zscore(callrecord.SUSPENDED_ZSET, "cl-a") is not None
            async with ws_connect(u, compression=None) as ws2:  # claim script: resumed
                await until(lambda: state("cl-a") == "live", "live again")
                for _ in range(5):
                    await ws2.send(bytes(320))
                await until(lambda: len(audio("cl-a")) == 55, "55 frames")
            await until(lambda: state("cl-a") == "ended", "ended")
            es = stream("cl-a")
            seqs = [m.seq for m in es if m.seq]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
            assert [m.type for m in es].count("call.started") == 2 and es[-1].type == "call.ended"
            assert rc.hget(keys.campaign_key("spring", "states"), "cl-a") == b"ended"
            # a drop that does not come back: the sweeper's script ends it
            ws = await ws_connect(url(gw, "cl-b"), compression=None)
            for _ in range(3):
                await ws.send(bytes(320))
            await until(lambda: len(audio("cl-b")) == 3, "3 frames")
            rst(ws)
            await until(lambda: state("cl-b") == "ended", "swept", timeout=15)
            ended = [m for m in stream("cl-b") if m.type == "call.ended"]
            assert len(ended) == 1 and ended[0].reason == "socket_lost" and ended[0].frames_in == 3
            # (after its script, the sweeper announces the end and leaves the set)
            await until(lambda: rc.zscore(callrecord.SUSPENDED_ZSET, "cl-b") is None, "unlisted")

            def lifecycle():
                return [(m.type, m.call_id) for m in (c.decode(f) for _, f in
                                                      rc.xrange(keys.CALLS_STREAM))]
            await until(lambda: ("call.ended", "cl-b") in lifecycle(), "announced")
            assert lifecycle().count(("call.ended", "cl-b")) == 1
            assert rc.zscore(keys.GATEWAYS_ZSET, GW) is not None  # the heartbeat's pipeline
            assert gw.metrics.c["redis_rejected"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 90))


@pytest.mark.integration
def test_a_stopped_primary_does_not_hold_its_calls_for_the_reply_timeout(redis_cluster, rc):
    """SIGSTOP (a hung or cut-off primary): no error, no reset, just no reply.
    Once the cluster promotes its replica the writer stops waiting for the
    old batch and writes it, and what followed, to the new primary."""
    import signal  # noqa: PLC0415

    calls = [f"stop-{i}" for i in range(30)]
    port = redis_cluster.primary_port_for(keys.call_stream(calls[0]))
    proc = redis_cluster.procs[port]

    async def main():
        pub = Publisher(redis_cluster.url, reply_timeout=30.0)
        pub.start()
        prefixes = {cid: pub.audio_prefix(cid) for cid in calls}
        await _until_connected(pub)
        refused = dict.fromkeys(calls, 0)
        seq, stopped_at, moved_after = 0, None, None
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 25:
                seq += 1
                for cid in calls:
                    if not pub.add_audio(prefixes[cid], seq, PCM):
                        refused[cid] += 1
                now = time.monotonic()
                if stopped_at is None and now - t0 > 1.0:
                    proc.send_signal(signal.SIGSTOP)
                    stopped_at = now
                elif stopped_at is not None and moved_after is None:
                    node = pub._route.get(prefixes[calls[0]])
                    if node is not None and node.addr[1] != port and pub.connected:
                        moved_after = now - stopped_at
                if moved_after is not None and now - stopped_at > moved_after + 1.0:
                    break
                await asyncio.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGCONT)
        assert moved_after is not None, "the writer never left the stopped primary"
        assert await pub.flush(15)
        await pub.close()
        return refused, seq, moved_after

    refused, last, moved_after = asyncio.run(asyncio.wait_for(main(), 60))
    redis_cluster.wait_healthy(30)
    print(f"\nprimary {port} stopped: its calls written to the promoted replica after "
          f"{moved_after:.2f}s; {sum(refused.values())} frames refused (metered)")
    assert moved_after < 10  # well under reply_timeout (30 s): not waited out
    for cid in calls:
        assert last - len(_consumed(_seqs(rc, cid))) == refused[cid]


@pytest.mark.integration
def test_a_manual_failover_mid_call_is_followed_without_loss(redis_cluster, rc):
    """``CLUSTER FAILOVER`` on a replica (a rolling upgrade): the old primary
    turns replica and answers MOVED; every entry lands once, in order. A dead
    first seed in the URL does not matter either."""
    from piopiy_voice.redisconn import free_port  # noqa: PLC0415

    cid = "manual-failover"
    key = keys.call_stream(cid)
    old = redis_cluster.primary_port_for(key)
    replica = redis_cluster.replica_ports_of(old)[0]
    url = redis_cluster.url.replace("://", f"://127.0.0.1:{free_port()},", 1)

    async def main():
        pub = Publisher(url)
        pub.start()
        prefix = pub.audio_prefix(cid)
        await _until_connected(pub)
        seq, t0, switched = 0, time.monotonic(), None
        while time.monotonic() - t0 < 20:
            seq += 1
            assert pub.add_audio(prefix, seq, PCM)
            if switched is None and seq == 50:
                await asyncio.to_thread(_node(replica).execute_command, "CLUSTER FAILOVER")
                switched = time.monotonic()
            if switched is not None and redis_cluster.primary_port_for(key) == replica \
                    and time.monotonic() - switched > 1.0 and seq > 150:
                break
            await asyncio.sleep(0.005)
        assert await pub.flush(10)
        await pub.close()
        return seq, pub.metrics.c

    last, c = asyncio.run(asyncio.wait_for(main(), 60))
    assert redis_cluster.primary_port_for(key) == replica
    assert _seqs(rc, cid) == list(range(1, last + 1))
    assert c["frames_published"] == last and c["redis_rejected"] == 0


# ------------------------------------------------------- TLS on every node
@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """Three TLS-only primaries with a password (no replicas), TLS on the bus too."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from cluster_support import _cluster_ports, _die_with_parent, cluster_binary  # noqa: PLC0415
    from test_redis_tls import _make_ca, _make_leaf  # noqa: PLC0415

    binary, cli = cluster_binary(), shutil.which("redis-cli")
    if not (binary and cli and shutil.which("openssl")):
        pytest.skip("no redis-server / redis-cli / openssl for a TLS cluster")
    d = tmp_path_factory.mktemp("tls-cluster")
    _make_ca(d, "ca")
    _make_leaf(d, "node", "ca", "subjectAltName=IP:127.0.0.1\n"
               "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n")
    tls = ["--tls-cert-file", str(d / "node.crt"), "--tls-key-file", str(d / "node.key"),
           "--tls-ca-cert-file", str(d / "ca.crt")]
    ports = _cluster_ports(3)  # (each with its bus port, + 10000, free too)
    procs = []
    try:
        for p in ports:
            (d / str(p)).mkdir()
            procs.append(subprocess.Popen(
                [binary, "--port", "0", "--tls-port", str(p), "--bind", "127.0.0.1", *tls,
                 "--tls-cluster", "yes", "--tls-replication", "yes", "--tls-auth-clients", "optional",
                 "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                 "--requirepass", "pw-tls", "--masterauth", "pw-tls", "--save", "",
                 "--appendonly", "no", "--dir", str(d / str(p))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent))
        cli_tls = [cli, "--tls", "--cacert", str(d / "ca.crt"), "--cert", str(d / "node.crt"),
                   "--key", str(d / "node.key"), "-a", "pw-tls", "--no-auth-warning"]
        deadline = time.monotonic() + 20
        for p in ports:
            while subprocess.run([*cli_tls, "-p", str(p), "PING"], capture_output=True,
                                 text=True).stdout.strip() != "PONG":
                assert time.monotonic() < deadline, "TLS node did not answer"
                time.sleep(0.1)
        subprocess.run([*cli_tls, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        while any("cluster_state:ok" not in subprocess.run(
                [*cli_tls, "-p", str(p), "CLUSTER", "INFO"], capture_output=True, text=True).stdout
                for p in ports):
            assert time.monotonic() < deadline, "TLS cluster not ok"
            time.sleep(0.1)
        yield f"rediss+cluster://:pw-tls@127.0.0.1:{ports[0]}", d / "ca.crt"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


@pytest.mark.integration
def test_rediss_cluster_writes_over_tls_with_auth_to_every_primary(tls_cluster):
    from piopiy_voice.redisconn import RedisTls, connect  # noqa: PLC0415

    url, ca = tls_cluster
    tls = RedisTls(ca_file=str(ca))
    calls = [f"tls-{i}" for i in range(30)]

    async def main():
        pub = Publisher(url, tls=tls)
        pub.start()
        for seq in range(1, 21):
            for cid in calls:
                assert pub.add_audio(pub.audio_prefix(cid), seq, PCM)
        assert await pub.flush(15), pub.last_error
        nodes = len(pub._nodes)
        await pub.close()
        return nodes

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 3
    client = connect(url, tls=tls)
    try:
        for cid in calls:
            assert [int(f[b"seq"]) for _, f in client.xrange(keys.call_stream(cid))] == \
                list(range(1, 21))
    finally:
        client.close()


@pytest.mark.integration
def test_the_gateway_rides_out_a_primary_kill_with_live_calls(redis_cluster, rc):
    """Ten live calls streaming; the primary holding the gateway's command
    stream is SIGKILLed. The writer resumes after the promotion, the command
    reader reads from the promoted replica, and every call's stream holds
    exactly the frames the gateway did not meter as dropped."""
    from websockets.asyncio.client import connect as ws_connect  # noqa: PLC0415

    from piopiy_voice import contracts as c  # noqa: PLC0415
    from test_fault_gateway_reconnect import command_reaches_socket  # noqa: PLC0415
    from test_gateway_server import GW, running, url  # noqa: PLC0415

    calls = [f"gk-{i}" for i in range(10)]

    async def scenario():
        async with running(redis_cluster.url, reconnect_grace_s=5.0) as (gw, client):
            deadline = time.monotonic() + 10
            while not gw._writer_state()[0]:
                assert time.monotonic() < deadline, "writer not ready"
                await asyncio.sleep(0.02)
            sockets = {cid: await ws_connect(url(gw, cid), compression=None) for cid in calls}
            sent = dict.fromkeys(calls, 0)
            stop = asyncio.Event()

            async def stream(cid):
                ws = sockets[cid]
                while not stop.is_set():
                    await ws.send(bytes(320))
                    sent[cid] += 1
                    await asyncio.sleep(0.02)

            streams = [asyncio.create_task(stream(cid)) for cid in calls]
            await asyncio.sleep(1.0)
            killed_at = time.monotonic()
            await asyncio.to_thread(redis_cluster.kill_primary_of, keys.gateway_commands(GW))
            while not gw._writer_state()[0] or time.monotonic() - killed_at < 0.5:
                assert time.monotonic() - killed_at < 20, "writer did not recover"
                await asyncio.sleep(0.02)
            recovered = time.monotonic() - killed_at
            # the command reader follows its stream to the promoted replica
            assert await command_reaches_socket(client, calls[0], sockets[calls[0]],
                                                "after the failover") == GW
            commanded = time.monotonic() - killed_at
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*streams)
            for ws in sockets.values():
                await ws.close()
            for cid in calls:
                deadline = time.monotonic() + 20
                while rc.hget(keys.call_meta(cid), "state") != b"ended":
                    assert time.monotonic() < deadline, f"{cid} not ended"
                    await asyncio.sleep(0.05)
            return sent, recovered, commanded, dict(gw.metrics.c)

    sent, recovered, commanded, m = asyncio.run(asyncio.wait_for(scenario(), 120))
    dropped = 0
    for cid in calls:
        es = [c.decode(f) for _, f in rc.xrange(keys.call_stream(cid))]
        _consumed([e.seq for e in es if e.seq])
        ended = [e for e in es if e.type == "call.ended"]
        assert len(ended) == 1, cid
        audio = len({e.seq for e in es if e.type == "audio"})
        assert ended[0].frames_in == sent[cid]
        assert audio == ended[0].frames_in - ended[0].frames_dropped, cid  # gaps == metered drops
        dropped += ended[0].frames_dropped
    print(f"\ngateway: writer ready again {recovered:.2f}s after the kill, a command delivered "
          f"after {commanded:.2f}s; {dropped} of {sum(sent.values())} frames metered as dropped")
