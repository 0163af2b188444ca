#!/usr/bin/env bash
# Build (or reuse) the virtual environment of one tested ComfyUI version: .venvs/comfyui-<version>.
#   bash scripts/venv.sh v0.33.0      -> prints the environment's python
#   bash scripts/venv.sh --list       -> the tested versions, oldest first (those with pinned requirements)
# Each version gets its own pinned requirements (requirements/comfyui-<version>.txt) with torch 2.13.0 (CPU): the
# versions need incompatible packages (frontend 1.27 vs 1.49, transformers 4 vs 5). The oldest version's
# environment also holds the bench (requirements/bench.txt). Rebuilt when its requirement files change.
set -euo pipefail
cd "$(dirname "$0")/.."
tested="$(ls requirements | sed -n 's/^comfyui-\(v.*\)\.txt$/\1/p' | sort -V)"
if [[ "$1" == --list ]]; then
    echo "$tested"
    exit 0
fi
version="$1"
oldest="$(head -1 <<< "$tested")"
venv=".venvs/comfyui-$version"
if [[ ! -f "requirements/comfyui-$version.txt" ]]; then
    echo "scripts/venv.sh: no requirements/comfyui-$version.txt: tested versions are $(tr '\n' ' ' <<< "$tested")" >&2
    exit 2
fi
files=(requirements/test.txt "requirements/comfyui-$version.txt" requirements/comfyui-nodeps.txt)
if [[ "$version" == "$oldest" ]]; then
    files+=(requirements/bench.txt)
fi
stamp="$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$venv/.stamp" || "$(cat "$venv/.stamp")" != "$stamp" ]]; then
    echo "scripts/venv.sh: building $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    reqs=()
    for f in "${files[@]}"; do
        [[ "$f" == requirements/comfyui-nodeps.txt ]] || reqs+=(-r "$f")
    done
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${reqs[@]}" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements/comfyui-nodeps.txt >&2
    echo "$stamp" > "$venv/.stamp"
fi
echo "$venv/bin/python"
