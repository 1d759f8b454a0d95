"""The gateway: terminates the platform's call WebSockets and bridges them to Redis.

Where things live:
    session.py    CallSession, the sans-I/O core of one call (reframing, text
                  events, commands -> platform messages, playout pacing)
    outbound.py   the exact JSON the platform understands on the live socket
    publisher.py  Publisher, the batched hand-written-RESP Redis writer
    commands.py   CommandReader, the single XREAD reader of this gateway's commands
    dispatch.py   Dispatcher: commands -> socket messages + results; playout loops
    connection.py DirectConnection: frames handed to the call synchronously
    server.py     Gateway (asyncio websockets server) and ``main`` (piopiy-voice gateway)
    control.py    CallHandle and ``main`` (piopiy-voice control)
    metrics.py    counters rendered as Prometheus text at /metrics
"""
