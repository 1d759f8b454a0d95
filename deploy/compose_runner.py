#!/usr/bin/env python3
"""Thin wrapper: the compose runner lives in the package, ``piopiy_voice.compose``.

    python deploy/compose_runner.py gateway=2 worker=2 dialer sandbox
    python -m piopiy_voice.compose gateway=2 worker=2 dialer sandbox   (the same)
"""

import sys

from piopiy_voice.compose import main

if __name__ == "__main__":
    sys.exit(main())
