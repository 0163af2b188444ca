#!/usr/bin/env bash
# The GPU check (reuse_bench/gpu_check.py) on the device machine, from the repository root there, with .device/
# carried (made here by scripts/gpu_check_prepare.sh): ComfyUI v0.33.0 from .device/comfyui, the packages the
# machine lacks installed from .device/wheels into /tmp, PyAV's import-only stand-in only where no real `av` imports.
# Writes gpu_check.json, gpu_check.md and gpu_check.log into $OUT (default out/gpu_check); further arguments go to
# `python3 -m reuse_bench.gpu_check` (e.g. --models sd15 flux, --rounds 2).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu_check}"
mkdir -p "$out"
log="$out/gpu_check.log"
if [[ ! -d .device/comfyui || ! -d .device/wheels ]]; then
    echo "gpu_check.sh: no .device/: run scripts/gpu_check_prepare.sh here first and carry .device" | tee "$log" >&2
    exit 2
fi
site=/tmp/gpu_check_site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .device/wheels/*.whl 2>&1 | tee "$log" || exit 2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import av" 2>/dev/null; then
    export PYTHONPATH="$PYTHONPATH:$PWD/.device/standins"
fi
export COMFYUI_PATH="$PWD/.device/comfyui" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee -a "$log"
python3 -m reuse_bench.gpu_check --out "$out" "$@" 2>&1 | tee -a "$log"
