#!/usr/bin/env bash
# Prepare .device/ (ignored by git) for scripts/gpu_check.sh, here, before a device run: the device machine has no
# network, no package registry and no ../shared. Idempotent; about 15 MB.
#   bash scripts/gpu_check_prepare.sh [COMFYUI_TREE]      (default ../shared/comfyui/v0.33.0)
#
# .device/comfyui    ComfyUI v0.33.0, without its tests, blueprints, API nodes, script examples and tokenizer
#                    vocabularies (read only when a text encoder is built; the check builds none)
# .device/wheels     the packages ComfyUI's `comfy` import chain needs that the machine's python3 lacks, at the
#                    versions of requirements/comfyui-v0.33.0.txt, for CPython 3.12 on manylinux x86-64: torchsde,
#                    trampoline, comfy-aimdo, and comfy-kitchen without its compiled CUDA/HIP backends (176 + 59 MB;
#                    ComfyUI then uses comfy-kitchen's eager backend, which the check records)
# .device/standins   an import-only stand-in for PyAV (`av`, 36 MB as a wheel), which comfy_api imports at module
#                    level for video types the check never uses; gpu_check.sh puts it on the path only where no real
#                    `av` imports (reuse_bench/comfyui_standins/_standin.py: any use raises)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/comfyui/v0.33.0}"
dest=.device
if [[ ! -f "$src/comfy/model_patcher.py" ]]; then
    echo "gpu_check_prepare.sh: $src is not a ComfyUI tree" >&2
    exit 2
fi
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >>"$exclude"
rm -rf "$dest"
mkdir -p "$dest/comfyui" "$dest/wheels" "$dest/standins/av"

tar -C "$src" -cf - \
    --exclude=./.git --exclude=./tests --exclude=./tests-unit --exclude=./blueprints --exclude=./comfy_api_nodes \
    --exclude=./script_examples --exclude=./comfy/sd1_tokenizer --exclude='./comfy/text_encoders/*_tokenizer' \
    --exclude=__pycache__ . | tar -C "$dest/comfyui" -xf -

pins=()
for name in torchsde trampoline comfy-aimdo comfy-kitchen; do
    pin="$(grep -iE "^${name}==" requirements/comfyui-v0.33.0.txt)" || {
        echo "gpu_check_prepare.sh: no pin for $name in requirements/comfyui-v0.33.0.txt" >&2
        exit 2
    }
    pins+=("$pin")
done
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$download" "${pins[@]}"
mv "$download"/torchsde-*.whl "$download"/trampoline-*.whl "$download"/comfy_aimdo-*.whl "$dest/wheels/"

# comfy-kitchen without its compiled backends: a pure-Python wheel of the rest (RECORD and WHEEL follow).
python3 - "$download"/comfy_kitchen-*.whl "$dest/wheels" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

source, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
name, version = source.name.split("-")[:2]
target = out_dir / f"{name}-{version}-py3-none-any.whl"
compiled = re.compile(r"comfy_kitchen/backends/(cuda|hip)/_C\.[^/]*\.(so|pyd)$")
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if compiled.search(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(line for line in lines if not compiled.search(line.split(",")[0])) + "\n").encode()
        elif item.filename.endswith(".dist-info/WHEEL"):
            text = re.sub(r"(?m)^Tag: .*\n", "", data.decode()).replace("Root-Is-Purelib: false", "Root-Is-Purelib: true")
            data = (text.rstrip("\n") + "\nTag: py3-none-any\n").encode()
        zout.writestr(item, data)
print(f"{target.name}: {target.stat().st_size / 2**20:.1f} MiB (from {source.stat().st_size / 2**20:.1f} MiB)")
EOF

cp reuse_bench/comfyui_standins/_standin.py "$dest/standins/"
cp reuse_bench/comfyui_standins/torchvision/__init__.py "$dest/standins/av/__init__.py"

du -sh "$dest"/* "$dest"
ls "$dest/wheels"
