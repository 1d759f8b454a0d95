"""The gateway: terminates the platform's call WebSockets and bridges them to Redis.

Where things live (one owner for each piece of a call's state):
    session.py    CallSession, the sans-I/O core of one call: seq, reframing,
                  dropped-frame (gap) accounting, text events, the one switch
                  on command type -> Outcome (messages, entries, what to do)
    pacing.py     Pacer, the sans-I/O playout queue and pacing clock
    playout.py    PlayoutTick: one timer paces every speaking call's audio
    registry.py   Registry of live calls (attach / replace / detach / end; the
                  one holder of "which gateway holds this call") and LiveCall
                  (session + current socket: publish_frame, hot-path sink,
                  its step of the playout tick: play_due)
    handshake.py  Handshake: routes, signature and limits before the upgrade;
                  Admission (what the socket is, where its seq resumes)
    dispatch.py   Dispatcher: commands -> Outcome carried out -> CommandResult
    commands.py   CommandReader, the single XREAD reader of this gateway's commands
    publisher.py  Publisher, the batched hand-written-RESP Redis writer
                  (its audio prefix is built from the contract)
    cluster_route.py  ClusterPublisher, that writer on a Redis Cluster (what
                  ``Publisher(url)`` builds for a cluster URL): one buffer and
                  connection per primary, entries routed by hash slot,
                  MOVED/ASK, failover and resharding followed
    connection.py DirectConnection: the platform's plain data frames read, and
                  the playout's messages framed and written, by itself and
                  synchronously (everything else left to ``websockets``)
    outbound.py   the exact JSON the platform understands on the live socket
    server.py     Gateway (wires the above into a websockets server) and
                  ``main`` (piopiy-voice gateway)
    control.py    CallHandle and ``main`` (piopiy-voice control)
    metrics.py    counters exported for Prometheus at /metrics
"""
