#!/usr/bin/env bash
# End to end on a GPU at the reference geometry (256x256x150 phantoms, the 3d-pixel-256 preset):
# synth -> a few training steps -> 25-step Euler samples -> one-step eval -> report, with wall times.
#   bash benchmarks/e2e_3d.sh [WORKDIR] [STEPS]
set -euo pipefail
work=${1:-/tmp/medgen-e2e}; steps=${2:-10}
rm -rf "$work"; mkdir -p "$work"
command -v medgen >/dev/null || medgen() { python3 -m medgen_cli "$@"; }
t() { local s=$(date +%s%N); "$@"; echo "TIME $(( ($(date +%s%N) - s) / 1000000 )) ms: $*" >&2; }
t medgen data synth "$work/data" --train 2 --val 2 --test 1 >/dev/null
t medgen train --preset 3d-pixel-256 --data "$work/data" --run-dir "$work/run" --max-steps "$steps" \
  --set train.log_every=5 --set train.preview_every=0 >/dev/null
t medgen sample --run "$work/run" --n 2 --batch-size 1 --steps 25 --out "$work/samples" >/dev/null
t medgen eval psnr --run "$work/run"
t medgen eval msssim --run "$work/run"
t medgen report "$work/run"
python3 - "$work" <<'PY'
import json, sys, nibabel as nib
work = sys.argv[1]
r = [json.loads(l) for l in open(f"{work}/samples/samples.jsonl")]
img = nib.load(r[0]["path"])
print("sample", r[0]["path"], img.shape, img.header.get_zooms(), "nfe", r[0]["nfe"])
PY
