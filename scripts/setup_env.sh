#!/usr/bin/env bash
# Build .venv if it is missing or stale: the project, vLLM for this machine (CUDA or CPU), dev tools.
# Safe to run repeatedly; it does nothing when the environment already matches the lock files.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOR=gpu
else
    FLAVOR=cpu
fi
LOCK=requirements/$FLAVOR.lock
STAMP=$VENV/.medusa-ray-$FLAVOR
want=$(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

echo ">> building $VENV for $FLAVOR ($LOCK)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# Machine-wide pip settings here may name local indexes that are absent; those warnings are noise.
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
if [ "$FLAVOR" = cpu ]; then
    # The CPU build of torch first, so nothing below pulls the multi-GB CUDA build.
    $PIP install -q -c "$LOCK" "torch==2.13.0"
fi
$PIP install -q -c "$LOCK" -e ".[$FLAVOR,dev]"
# EAGLE-3's draft model, loss and save format come from vLLM's `speculators` library. Its metadata pins
# datasets<=5.1 and pulls torchvision/torchaudio, none of which its model code imports: install it (and
# hs-connectors, which its package import needs) without dependencies, at the locked versions.
$PIP install -q --no-deps -c "$LOCK" speculators hs-connectors
if [ "$FLAVOR" = cpu ]; then
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to import beside CPU torch. Triton is a
    # GPU kernel compiler (xgrammar's GPU path): vLLM's CPU build disables it, warning so in every process.
    $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "$want" > "$STAMP"
echo ">> $VENV ready"
