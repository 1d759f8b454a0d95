"""The seed example of the Piopiy SDK docs, corrected, running on this project.

What the docs' seed does: stream the call's audio to a WebSocket (the callee's
side, 8 kHz, from the moment the call is answered), then play a music file,
then hang up. The published version does not run: a comma is missing after
``stream.PCMO()``, its numbers are placeholders, and the SDK's ``voice.call``
rejects the JSON string ``StreamAction.PCMO()`` returns. Here the same steps
run unchanged against the real platform or the local sandbox: everything comes
from the environment.

    PIOPIY_APP_ID, PIOPIY_APP_TOKEN       credentials
    PIOPIY_BASE_URL, PIOPIY_ACTION_URL    the platform, or the sandbox's http://127.0.0.1:PORT
    PIOPIY_CALLER_ID                      your Piopiy number (caller id)
    PV_GATEWAY_PUBLIC_URL                 the ws(s):// base the platform dials (our gateway)
    PV_SIGNING_SECRET                     signs the stream URL (the gateway checks it)

Run:  python examples/seed_example.py 919876543210 [--music hold.wav]
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid


from piopiy_voice import PiopiyError, RestClient, StreamAction  # noqa: E402
from piopiy_voice.settings import Settings  # noqa: E402
from piopiy_voice.signing import sign_stream_url  # noqa: E402

LISTEN_MODE = "callee"
VOICE_QUALITY = "8000"  # the docs pass it as a string; it goes on the wire as 8000
DEFAULT_MUSIC = "hold_music.wav"


def build_pcmo(ws_url: str, music: str = DEFAULT_MUSIC) -> str:
    """The seed's PCMO, as the JSON string ``StreamAction.PCMO()`` returns."""
    stream = StreamAction()
    stream.stream(ws_url, {
        "listen_mode": LISTEN_MODE,
        "voice_quality": VOICE_QUALITY,
        "stream_on_answer": True,
    })
    stream.playMusic(music)
    stream.hangup()
    return stream.PCMO()


def stream_url(settings: Settings, call_id: str) -> str:
    """A signed ws_url naming the call (the gateway authenticates the socket with it)."""
    return sign_stream_url(
        settings.gateway_public_url, call_id, settings.signing_secret,
        ttl_s=settings.stream_url_ttl_s,
        params={"rate": str(int(VOICE_QUALITY)), "mode": LISTEN_MODE},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Place the SDK docs' seed call (stream, music, hang up).")
    parser.add_argument("to", help="number to call, country code first (e.g. 919876543210)")
    parser.add_argument("--music", default=DEFAULT_MUSIC, help="file name or http(s) URL to play")
    parser.add_argument("--caller-id", help="Piopiy number to call from (default: PIOPIY_CALLER_ID)")
    parser.add_argument("--call-id", help="our call id, put in the stream URL (default: random)")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    caller_id = args.caller_id or settings.piopiy_caller_id
    if not caller_id:
        print("error: set PIOPIY_CALLER_ID or pass --caller-id", file=sys.stderr)
        return 2
    call_id = args.call_id or f"seed-{uuid.uuid4().hex[:12]}"
    try:
        pcmo = build_pcmo(stream_url(settings, call_id), args.music)
        with RestClient.from_settings(settings) as client:
            reply = client.voice.call(args.to, caller_id, pcmo)
    except (PiopiyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"call_id": call_id, "reply": reply}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
