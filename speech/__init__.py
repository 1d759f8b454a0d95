"""Speech: voice activity, turn-taking, recognition, synthesis (issue 13).

Small public surface over one module per concept:

- ``vad``          ``make_vad(name, rate)`` -> a per-call ``Vad`` (energy | webrtc | silero)
- ``turns``        ``TurnDetector``: speech probabilities -> speech_start / speech_end events
- ``asr``          ``make_recognizer(name)`` -> ``Recognizer`` (pocketsphinx | deepgram)
- ``tts``          ``make_synthesizer(name)`` -> ``Synthesizer`` (espeak | platform | http)
- ``text``         cut a stream of model tokens into speakable sentences early
- ``transcriber``  the pure per-call core of the ``transcriber`` role
- ``config``       the ``PV_*`` environment knobs of this package

Heavy engines (pocketsphinx, onnxruntime, websockets, libespeak-ng) are imported
only when an engine that needs them is made.
"""

from piopiy_voice.blas import single_threaded

single_threaded()  # before numpy loads: see piopiy_voice.blas
