"""Scripted callers: what the person on the phone does, as data.

A scenario is a JSON (or, when PyYAML is installed, YAML) document::

    {"name": "demo", "max_duration_s": 60,
     "steps": [{"wait_for": "agent_audio", "timeout_ms": 8000},
               {"say": {"text": "What are your opening hours?", "voice": "en-us"}},
               {"say": {"ms": 1500}},
               {"silence": 400},
               {"dtmf": "0", "tone_ms": 120},
               {"hangup": true}],
     "after_steps": "hangup",
     "human": {"answer_after_ms": 800, "steps": [{"say": {"text": "How can I help you?"}}]},
     "expect": {"heard": ["opening hours"], "said": ["open"]}}

Each step is an object with exactly one action key (``say``, ``silence``,
``dtmf``, ``wait_for``, ``hangup``) plus that action's options. ``human`` is
the script of the simulated human agent who answers a ``bridge``; it uses the
same steps (for the human, "agent audio" means what the human hears: the
caller).

A ``say`` speaks one of: ``text`` (real speech synthesized by espeak-ng in
``voice`` at the call's rate, rendered before the call is answered by
``piopiy_voice.sandbox.voice``, never on the call's clock), ``ms`` of
speech-like noise, or a ``wav`` file.

``expect`` is not acted out: it says what the call must show, checked by
whoever can see the app's side (``piopiy_voice.sandbox.expect``: the demo and
the end-to-end tests read the app's transcripts and commands from Redis).

Bundled scenarios live in ``sandbox/scenarios/<name>.json``; :func:`load_scenario`
takes a bundled name or a path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from piopiy_voice.audio import DTMF_KEYS

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
#: The espeak-ng voice of a ``say`` with ``text`` and no ``voice``.
DEFAULT_VOICE = "en-us"
MAX_SAY_CHARS = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SaySpec(_Strict):
    """Speech: a sentence synthesized from ``text`` (espeak-ng ``voice``),
    speech-like audio of ``ms``, or the audio of a WAV file."""

    text: str | None = Field(None, min_length=1, max_length=MAX_SAY_CHARS)
    #: espeak-ng voice of a ``text`` say (en-us, en, en-us+f3, en-gb-scotland...).
    voice: str = Field(DEFAULT_VOICE, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+\-]+$")
    ms: int | None = Field(None, gt=0, le=600_000)
    wav: str | None = None
    seed: int = 0
    level_db: float = Field(-20.0, le=0)

    @model_validator(mode="after")
    def _one_source(self) -> "SaySpec":
        if sum(x is not None for x in (self.text, self.ms, self.wav)) != 1:
            raise ValueError("say needs exactly one of 'text', 'ms' or 'wav'")
        if self.text is not None and not self.text.strip():
            raise ValueError("say text is blank")
        return self


class SayStep(_Strict):
    say: SaySpec


class SilenceStep(_Strict):
    silence: int = Field(gt=0, le=600_000, description="milliseconds")


class DtmfStep(_Strict):
    dtmf: str = Field(min_length=1, max_length=32)
    tone_ms: int = Field(100, ge=40, le=2000)
    gap_ms: int = Field(100, ge=40, le=2000)

    @field_validator("dtmf")
    @classmethod
    def _keys(cls, v: str) -> str:
        bad = sorted(set(v.upper()) - set(DTMF_KEYS))
        if bad:
            raise ValueError(f"not DTMF keys: {''.join(bad)!r}")
        return v.upper()


class WaitForStep(_Strict):
    """Stay silent until the other side is heard talking (``agent_audio``) or has
    been quiet for ``min_silence_ms`` (``agent_silence``)."""

    wait_for: Literal["agent_audio", "agent_silence"]
    timeout_ms: int = Field(10_000, gt=0, le=600_000)
    min_silence_ms: int = Field(700, ge=20, le=60_000)
    on_timeout: Literal["continue", "hangup"] = "continue"


class HangupStep(_Strict):
    hangup: Literal[True]


_TAG_OF_CLASS = {"SayStep": "say", "SilenceStep": "silence", "DtmfStep": "dtmf",
                 "WaitForStep": "wait_for", "HangupStep": "hangup"}


def _step_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return _TAG_OF_CLASS.get(type(value).__name__)
    if not isinstance(value, dict):
        return None
    kinds = [k for k in _TAG_OF_CLASS.values() if k in value]
    return kinds[0] if len(kinds) == 1 else None


Step = Annotated[
    Union[
        Annotated[SayStep, Tag("say")],
        Annotated[SilenceStep, Tag("silence")],
        Annotated[DtmfStep, Tag("dtmf")],
        Annotated[WaitForStep, Tag("wait_for")],
        Annotated[HangupStep, Tag("hangup")],
    ],
    Discriminator(
        _step_tag,
        custom_error_type="step_kind",
        custom_error_message="a step needs exactly one of: say, silence, dtmf, wait_for, hangup",
    ),
]


class HumanScript(_Strict):
    """The simulated human agent reached through ``bridge``."""

    answer_after_ms: int = Field(800, ge=0, le=120_000)
    steps: list[Step] = Field(
        default_factory=lambda: [
            SayStep(say=SaySpec(ms=1800, seed=101)),
            SilenceStep(silence=600),
            SayStep(say=SaySpec(ms=1400, seed=102)),
        ]
    )
    #: What the human does once the steps are done: stay on the line silent, or hang up.
    after_steps: Literal["stay", "hangup"] = "stay"


class Expectations(_Strict):
    """What the app must have heard and said on a call (case-insensitive
    substrings of the joined texts; see ``piopiy_voice.sandbox.expect``)."""

    #: In the final transcripts of the caller (channel ``caller``).
    heard: list[str] = Field(default_factory=list)
    #: In the text of what the agent sent (``PlayAudio``/``Speak`` texts).
    said: list[str] = Field(default_factory=list)
    #: In the final transcripts of the monitored conversation after a hand-off
    #: (channel ``conversation``).
    conversation: list[str] = Field(default_factory=list)

    @field_validator("heard", "said", "conversation")
    @classmethod
    def _phrases(cls, v: list[str]) -> list[str]:
        if any(not isinstance(p, str) or not p.strip() for p in v):
            raise ValueError("expected phrases must be non-empty strings")
        return [p.strip() for p in v]

    @property
    def empty(self) -> bool:
        return not (self.heard or self.said or self.conversation)


class Scenario(_Strict):
    name: str = "unnamed"
    description: str = ""
    #: Hard cap on the call's length; the platform hangs up then.
    max_duration_s: float = Field(120.0, gt=0, le=24 * 3600)
    steps: list[Step] = Field(default_factory=list)
    #: What the caller does once the steps are done: hang up, or stay on the line silent
    #: until the other side ends the call (or ``max_duration_s``).
    after_steps: Literal["hangup", "stay"] = "hangup"
    human: HumanScript = Field(default_factory=HumanScript)
    #: Energy (dBFS of a 20 ms frame) above which heard audio counts as "talking".
    talk_threshold_db: float = Field(-45.0, le=0)
    #: What the app must have heard and said (checked by the demo and tests).
    expect: Expectations = Field(default_factory=Expectations)


class ScenarioError(ValueError):
    """A scenario could not be found or is invalid; ``field`` names the bad part."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def bundled_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.json"))


def parse_scenario(data: Any, *, name: str | None = None, base_dir: Path | None = None) -> Scenario:
    """Validate a scenario document (a dict); relative WAV paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ScenarioError("a scenario must be a JSON object", field="scenario")
    if name and "name" not in data:
        data = {**data, "name": name}
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        parts: list[str] = []
        for i, part in enumerate(err["loc"]):
            # The discriminated union puts its tag in the path ("steps.0.say.say"): drop it.
            if i and isinstance(err["loc"][i - 1], int) and part in _TAG_OF_CLASS.values():
                continue
            parts.append(str(part))
        loc = ".".join(parts)
        raise ScenarioError(f"scenario {loc or '?'}: {err['msg']}", field=loc or None) from None
    if base_dir is not None:
        scenario = _resolve_wavs(scenario, base_dir)
    return scenario


def _resolve_wavs(scenario: Scenario, base_dir: Path) -> Scenario:
    def fix(steps: list) -> list:
        out = []
        for step in steps:
            if isinstance(step, SayStep) and step.say.wav and not Path(step.say.wav).is_absolute():
                step = SayStep(say=step.say.model_copy(update={"wav": str(base_dir / step.say.wav)}))
            out.append(step)
        return out

    human = scenario.human.model_copy(update={"steps": fix(scenario.human.steps)})
    return scenario.model_copy(update={"steps": fix(scenario.steps), "human": human})


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A bundled scenario by name (``"demo"``) or a scenario file by path."""
    text = str(name_or_path).strip()
    if not text:
        raise ScenarioError("empty scenario name", field="scenario")
    path = Path(text)
    if not path.suffix and "/" not in text and "\\" not in text:
        bundled = SCENARIO_DIR / f"{text}.json"
        if not bundled.is_file():
            raise ScenarioError(
                f"unknown scenario {text!r} (bundled: {', '.join(bundled_names())})", field="scenario"
            )
        path = bundled
    if not path.is_file():
        raise ScenarioError(f"scenario file not found: {path}", field="scenario")
    raw = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # optional: JSON needs nothing extra
            except ImportError:
                raise ScenarioError(
                    f"{path}: YAML scenarios need PyYAML (pip install pyyaml); or write it as JSON",
                    field="scenario",
                ) from None
            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except ScenarioError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse error is the file's fault
        raise ScenarioError(f"{path}: not valid {path.suffix or 'JSON'}: {exc}", field="scenario") from None
    return parse_scenario(data, name=path.stem, base_dir=path.parent)


def say_texts(scenario: Scenario) -> list[tuple[str, str]]:
    """Every (text, voice) the caller and the human will speak, in script order."""
    return [(s.say.text, s.say.voice) for s in (*scenario.steps, *scenario.human.steps)
            if isinstance(s, SayStep) and s.say.text is not None]
