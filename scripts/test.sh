#!/usr/bin/env bash
# README "Run the tests": install pinned test dependencies, lint, run every test.
# Tests that need real ComfyUI find it via COMFYUI_PATH, /opt/ComfyUI or the pack's custom_nodes parent,
# and skip with the reason where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps -r requirements-comfyui-nodeps.txt
python -m ruff check .
python -m pytest -q "$@"
