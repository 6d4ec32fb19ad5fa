#!/usr/bin/env bash
# The prepared H200 check for msam: exactness of every strategy on CUDA, `bench speed` for
# resnet18 and vit_tiny (32 px, batch 256, bf16, m in 1..32, every strategy) and the wall time of
# one Fashion-MNIST epoch of resnet18 for SGD, SAM and mSAM (m = 8). One call, about 5 minutes.
# README.md beside this file says how to carry what it needs and where the results land.
#
#   MSAM_GPU_SMALL=1 MSAM_GPU_DEVICE=cpu OUT=/tmp/dry bash benchmarks/gpu/run.sh   # CPU dry run
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT:-benchmarks/results/gpu-local}
CARRY=${MSAM_GPU_CARRY:-.gpu-carry}
DEVICE=${MSAM_GPU_DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

# Packages the GPU image lacks (pydantic for msam.config), carried as wheels.
if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/msam-site "$CARRY"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/msam-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${MSAM_GPU_SMALL:-0}" = 1 ]; then
  # Dry run: the same commands with sizes a CPU finishes in a couple of minutes.
  RESNET=test_resnet; VIT=test_vit; IMG=16; BATCH=16; MS=1,2,4; STEPS=1; WARMUP=1; AMP=none
  EXACT_ARGS=(--models test_resnet,test_vit --batch-size 8 --micro-batches 4)
  EPOCH_ARGS=(--model test_resnet --batch-size 64 --subset 512 --amp none)
else
  RESNET=resnet18; VIT=vit_tiny; IMG=32; BATCH=256; MS=1,2,4,8,16,32; STEPS=20; WARMUP=3; AMP=bf16
  EXACT_ARGS=(--models resnet18,vit_tiny --batch-size 64 --micro-batches 8)
  EPOCH_ARGS=(--model resnet18 --batch-size 256 --amp auto)
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import sys, torch, timm; print(sys.version); print("torch", torch.__version__,
"cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "timm", timm.__version__)'
} >"$OUT_DIR/env.txt" 2>&1

# Everything below is also logged; the profiler chatter of CPU-only torch builds is dropped.
exec > >(grep --line-buffered -v -e '^USDT' -e 'gpuGetDeviceCount' | tee "$OUT_DIR/log.txt") 2>&1
status=0
echo "== exactness of every strategy on $DEVICE"
"$PY" benchmarks/gpu/check_exact.py --device "$DEVICE" "${EXACT_ARGS[@]}" \
  --json "$OUT_DIR/gpu-exact.json" || status=1
for model in "$RESNET" "$VIT"; do
  echo "== bench speed $model"
  "$PY" -m sweeps.cli bench speed --model "$model" --img-size $IMG --batch-size $BATCH \
    --micro-batches $MS --steps $STEPS --warmup $WARMUP --device "$DEVICE" --amp $AMP \
    --strategy all --json "$OUT_DIR/gpu-speed-$model.json" || status=1
done
echo "== one Fashion-MNIST epoch"
"$PY" benchmarks/gpu/fmnist_epoch.py --root "$CARRY" --device "$DEVICE" "${EPOCH_ARGS[@]}" \
  --json "$OUT_DIR/gpu-fmnist-epoch.json" || status=1
echo "exit status $status; results in $OUT_DIR"
exit $status
