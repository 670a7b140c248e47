#!/usr/bin/env bash
# The GPU check of the speed work (issue 5), prepared to run once on a CUDA machine, in under
# 5 minutes: `optstate bench` for ResNet-50 at 128 and 160 px, then a short real training run
# (the seed study's four arms, 2+1+1 epochs) on a generated Imagenette-like folder. Writes
# bench-resnet50-128.json, bench-resnet50-160.json, run.log and report.md into $OUT
# (default benchmarks/out). Run from the repository root:
#     bash benchmarks/gpu_check.sh
# The variables below shrink it for a rehearsal on a CPU, as tests/test_gpu_check.py does:
#     DEVICE=cpu MODEL=small-cnn SIZES="28" BATCH=16 STEPS=2 BLOCKS=1 RUN_MODEL=small-cnn bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-benchmarks/out}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-resnet50}
SIZES=${SIZES:-"128 160"}
BATCH=${BATCH:-100}        # the seed preset's batch size, so that its projection uses the measured speed
STEPS=${STEPS:-20}
BLOCKS=${BLOCKS:-3}
RUN_MODEL=${RUN_MODEL:-resnet50}
RUN_IMAGES=${RUN_IMAGES:-100}  # training images per class in the generated folder (10 classes)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! "$PY" -c "import optstate" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # run from the checkout without installing
fi
"$PY" - "$DEVICE" <<'PY'
import sys, torch
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device: set DEVICE=cpu for a rehearsal"
    print("torch", torch.__version__, "on", torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported())
else:
    print("torch", torch.__version__, "on the CPU (rehearsal)")
PY
start=$SECONDS
for size in $SIZES; do
  "$PY" -m optstate bench --device "$DEVICE" --model "$MODEL" --image-size "$size" --batch-size "$BATCH" \
    --steps "$STEPS" --blocks "$BLOCKS" --json "$OUT/bench-$MODEL-$size.json"
done
data="$OUT/generated"
"$PY" -c "from pathlib import Path; from optstate.bench import make_image_folder; make_image_folder(Path('$data'), train_per_class=$RUN_IMAGES, val_per_class=20)"
"$PY" -m optstate run --preset seed --device "$DEVICE" --out "$OUT/run" --data-root "$OUT/data-root" \
  --set "datasets=[\"$data\"]" --set "model=\"$RUN_MODEL\"" --set "image_size=${SIZES%% *}" --set "batch_size=$BATCH" \
  --set 'sessions=[{epochs=2, constant={lr=3e-4}, onecycle={max_lr=1e-3}}, {epochs=1, constant={lr=3e-4}, onecycle={max_lr=1e-5}}, {epochs=1, constant={lr=8e-5}, onecycle={max_lr=1e-6}}]' \
  2>&1 | tee "$OUT/run.log"
cp "$OUT/run/report.md" "$OUT/report.md"
rm -rf "$data" "$OUT/data-root"
echo "gpu_check: done in $((SECONDS - start)) s; JSON in $OUT"
