"""The pipecat side of ``bench/pipecat_bench.py``: a Piopiy voice bot written the
way a pipecat user would write it, doing the same work as ``bench/pipecat_agent.py``.

Runs in its own venv, never in the project's (the install command is in
``bench/pipecat_bench.py``'s docstring)::

    /work/pipecat-venv/bin/python bench/pipecat_server.py --port P --clip FILE

Theory of operation
-------------------
One process: a FastAPI app served by uvicorn (uvloop), one WebSocket route
``/call/{call_id}`` (the ``ws_url`` a Piopiy ``stream`` PCMO would name). Each
accepted socket gets its own pipecat pipeline, run by its own ``WorkerRunner``,
as pipecat's telephony examples do with their FastAPI transport:

    transport.input()  ->  VADProcessor(ProjectVADAnalyzer)  ->  UserTurnProcessor
        ->  ClipPlayer  ->  transport.output()

- ``PiopiyFrameSerializer`` speaks Piopiy's media protocol
  (``/work/shared/piopiy-protocol.md`` section 3): a binary message is raw
  16-bit LE PCM at the call's rate (``InputAudioRawFrame``, no resampling:
  the pipeline runs at the call's rate); text messages from the platform
  are ignored; out, an ``OutputAudioRawFrame`` becomes one ``streamAudio``
  JSON object (base64 PCM) and an ``InterruptionFrame`` becomes
  ``{"action":"break"}``.
- ``ProjectVADAnalyzer`` is a pipecat ``VADAnalyzer`` whose per-frame
  confidence is the project's own VAD (``speech.vad.make_vad``, the engine the
  worker uses by default, ``energy``), imported from this repository's
  source: both systems run the same VAD code on the same 20 ms frames.
  Pipecat's own state machine turns the scores into start/stop, with the
  project's onset and hangover (``--onset-ms``, ``--hangover-ms``) as
  ``start_secs``/``stop_secs`` and the detector's threshold (0.5) as
  ``confidence``; ``min_volume`` 0 so the decision is the VAD's alone
  (pipecat still computes its loudness per frame: that is its base class).
- ``UserTurnProcessor``: a user turn starts on the VAD's start
  (``VADUserTurnStartStrategy``: pipecat broadcasts an interruption, which
  empties the output queue and sends ``break``) and stops on the VAD's stop
  (``SpeechTimeoutUserTurnStopStrategy`` with no extra timeout and no
  transcript wait: no STT runs). Its ``on_user_turn_stopped`` plays the clip.
- ``ClipPlayer`` pushes the fixed clip (raw PCM at the call's rate, from
  ``--clip``) as one ``OutputAudioRawFrame``; the output transport cuts it in
  40 ms chunks and paces them at real time (pipecat's default
  ``audio_out_10ms_chunks`` = 4, the same 40 ms as our gateway's chunks).
  It also greets: the clip plays when the client connects.

Lean settings, so pipecat is not charged for extras the bench does not need:
no RTVI (``enable_rtvi=False``), no turn tracking, no metrics, loguru at
WARNING. ``--pipecat-defaults`` keeps RTVI and turn tracking on (what a
pipeline gets unless told otherwise) for comparison.
"""

import argparse
import base64
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_project_vad_module(root: Path = ROOT):
    """The project's ``speech/vad.py`` (of the tree at ``root``) as
    ``piopiy_voice.speech.vad``, without installing the project into this venv
    (numpy and soxr are already here: pipecat needs them too). The package
    layout is pyproject's ``package-dir``."""
    for name, folder in (("piopiy_voice", root / "shared"), ("piopiy_voice.speech", root / "speech")):
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    import piopiy_voice.speech.vad as vad  # noqa: PLC0415 (after the package is mapped)

    return vad


def build_app(clip: bytes, *, onset_ms: int, hangover_ms: int, vad_name: str, defaults: bool,
              project_root: Path = ROOT):
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import PlainTextResponse
    from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
    from pipecat.frames.frames import (Frame, InputAudioRawFrame, InterruptionFrame,
                                       OutputAudioRawFrame)
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.serializers.base_serializer import FrameSerializer
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
    from pipecat.turns.user_start import VADUserTurnStartStrategy
    from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
    from pipecat.turns.user_turn_processor import UserTurnProcessor
    from pipecat.turns.user_turn_strategies import UserTurnStrategies
    from pipecat.workers.runner import WorkerRunner

    project_vad = load_project_vad_module(project_root)

    class PiopiyFrameSerializer(FrameSerializer):
        """Piopiy's media WebSocket: binary L16 in; ``streamAudio`` / ``break`` out."""

        def __init__(self, rate: int) -> None:
            super().__init__()
            self.rate = rate

        async def serialize(self, frame: Frame) -> str | bytes | None:
            if isinstance(frame, InterruptionFrame):
                return '{"action":"break"}'
            if isinstance(frame, OutputAudioRawFrame):
                return json.dumps({"type": "streamAudio", "data": {
                    "audioDataType": "raw", "sampleRate": frame.sample_rate,
                    "audioData": base64.b64encode(frame.audio).decode("ascii")}}, separators=(",", ":"))
            return None

        async def deserialize(self, data: str | bytes) -> Frame | None:
            if isinstance(data, (bytes, bytearray)):
                if not data or len(data) % 2:
                    return None
                return InputAudioRawFrame(audio=bytes(data), sample_rate=self.rate, num_channels=1)
            return None  # the platform's text frames are undocumented: never fail on one

    class ProjectVADAnalyzer(VADAnalyzer):
        """Pipecat's VAD interface over the project's VAD (one instance per call)."""

        def __init__(self, name: str, *, params: VADParams) -> None:
            super().__init__(params=params)
            self.name = name
            self.vad = None

        def num_frames_required(self) -> int:
            return self.sample_rate // 50  # 20 ms, the frames the project's VAD takes

        def set_sample_rate(self, sample_rate: int) -> None:
            super().set_sample_rate(sample_rate)
            self.vad = project_vad.make_vad(self.name, self.sample_rate)

        def voice_confidence(self, buffer: bytes) -> float:
            return self.vad.speech_prob(buffer)

    class ClipPlayer(FrameProcessor):
        """Passes frames through; ``play()`` queues the fixed clip for the output."""

        def __init__(self, rate: int) -> None:
            super().__init__()
            self.rate = rate

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            await self.push_frame(frame, direction)

        async def play(self) -> None:
            await self.push_frame(OutputAudioRawFrame(audio=clip, sample_rate=self.rate, num_channels=1))

    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return PlainTextResponse("ok")

    @app.websocket("/call/{call_id}")
    async def call(websocket: WebSocket, call_id: str):
        await websocket.accept()
        rate = int(websocket.query_params.get("rate", "8000"))
        transport = FastAPIWebsocketTransport(websocket=websocket, params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=rate,
            audio_out_sample_rate=rate, serializer=PiopiyFrameSerializer(rate), allowed_origins=[]))
        vad = VADProcessor(vad_analyzer=ProjectVADAnalyzer(vad_name, params=VADParams(
            confidence=0.5, start_secs=onset_ms / 1000, stop_secs=hangover_ms / 1000, min_volume=0.0)))
        turns = UserTurnProcessor(user_turn_strategies=UserTurnStrategies(
            start=[VADUserTurnStartStrategy()],
            stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.0, wait_for_transcript=False)]))
        player = ClipPlayer(rate)
        pipeline = Pipeline([transport.input(), vad, turns, player, transport.output()])
        extra = {} if defaults else {"enable_rtvi": False, "enable_turn_tracking": False}
        worker = PipelineWorker(pipeline, params=PipelineParams(
            audio_in_sample_rate=rate, audio_out_sample_rate=rate), idle_timeout_secs=None, **extra)

        @turns.event_handler("on_user_turn_stopped")
        async def on_user_turn_stopped(_proc, _strategy):
            await player.play()

        @transport.event_handler("on_client_connected")
        async def on_client_connected(_transport, _ws):
            await player.play()

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(_transport, _ws):
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    return app


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clip", required=True, help="raw 16-bit LE mono PCM at the calls' rate")
    ap.add_argument("--onset-ms", type=int, default=80)
    ap.add_argument("--hangover-ms", type=int, default=400)
    ap.add_argument("--vad", default="energy")
    ap.add_argument("--project-root", type=Path, default=ROOT, help="the tree whose speech/vad.py to run")
    ap.add_argument("--pipecat-defaults", action="store_true",
                    help="keep RTVI and turn tracking on (pipecat's defaults)")
    args = ap.parse_args()

    import uvicorn
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    clip = Path(args.clip).read_bytes()
    app = build_app(clip, onset_ms=args.onset_ms, hangover_ms=args.hangover_ms, vad_name=args.vad,
                    defaults=args.pipecat_defaults, project_root=args.project_root)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", loop="uvloop",
                ws_max_size=2 ** 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
