"""``python -m piopiy_voice.api`` = ``piopiy-voice api``."""

import sys

from .server import main

sys.exit(main())
