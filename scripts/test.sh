#!/usr/bin/env bash
# The README's test command (details: docs/development.md): every test, against every tested ComfyUI version, each in its own virtual environment.
#
#   bash scripts/test.sh                  all versions: the whole suite on v0.3.64, every ComfyUI test on v0.33.0
#   bash scripts/test.sh v0.33.0 [ARGS]   one version (ARGS go to pytest, e.g. -k flux, or -m "not comfyui and not slow")
#
# A version is a tree in ../shared/comfyui/ with a pinned requirements/comfyui-<version>.txt; scripts/venv.sh builds
# its environment (.venvs/comfyui-<version>, torch 2.13.0 CPU) on first use. Against any other ComfyUI tree, use an
# environment that has its requirements: COMFYUI_PATH=/path/to/ComfyUI .venvs/comfyui-v0.33.0/bin/python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1  # never write __pycache__ into the read-only upstream trees
# The tested versions are those with pinned requirements; the oldest also runs everything that needs no ComfyUI.
mapfile -t versions < <(bash scripts/venv.sh --list)
oldest="${versions[0]}"
if [[ $# -gt 0 && "$1" == v* ]]; then
    versions=("$1")
    shift
fi
trees="$(cd .. && pwd)/shared/comfyui"
status=0
log="$(mktemp)"
since="$(mktemp)"  # the upstream trees must come out of the run untouched (CI gets them read-only, as root)
trap 'rm -f "$log" "$since"' EXIT
for version in "${versions[@]}"; do
    if [[ ! -f "$trees/$version/comfy/model_patcher.py" ]]; then
        echo "scripts/test.sh: ComfyUI $version not found at $trees/$version (the upstream trees live in ../shared/comfyui)" >&2
        exit 1
    fi
    python="$(bash scripts/venv.sh "$version")"
    select=()
    if [[ "$version" != "$oldest" ]]; then
        select=(-m comfyui)  # tests without ComfyUI do not depend on its version: run once, above
    fi
    if [[ "$version" == "${versions[0]}" ]]; then
        "$python" -m ruff check .
    fi
    echo "== ComfyUI $version ($trees/$version)"
    # -p no:cacheprovider: one run per version must not see the other's last-failed cache
    COMFYUI_PATH="$trees/$version" "$python" -m pytest -q -p no:cacheprovider "${select[@]}" "$@" 2>&1 \
        | tee -a "$log" || status=$?
done
written="$(find "$trees" -newer "$since" -print -quit)"
if [[ -n "$written" ]]; then
    echo "scripts/test.sh: the tests wrote into the upstream ComfyUI trees (e.g. $written)" >&2
    status=1
fi
# One closing line for the versions together (each pytest run above printed its own).
count() { grep -E '^(=+ )?[0-9]+ [a-z]+.* in [0-9.]+s' "$log" | grep -oE "[0-9]+ $1" | awk '{n += $1} END {print n + 0}'; }
echo "total: $(count passed) passed, $(( $(count failed) + $(count error) )) failed, $(count skipped) skipped"
exit $status
