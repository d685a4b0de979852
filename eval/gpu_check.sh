#!/usr/bin/env bash
# Issue 7's GPU checks as one device run (one `run` call, under its 10-minute limit): the GPU tests, the kernel bench
# and the full-size benches, each under its own timeout; logs and JSON in one archive, $OUT/gpu-check.tar.gz (a run
# brings back at most 8 files). A lent machine reaches no network:
# before the call, where pip works, download into .whl/ (git-ignored) what its image lacks (transformers >= 5.20;
# flash-attn built for its torch, to time flash_attention_2) with the device tool's `pip download` line, and carry
# .whl (bash eval/gpu_wheels.sh does it). Run from the repository root: bash eval/gpu_check.sh
# A dry run of the plumbing on a CPU, small models:
#   DEVICE=cpu SIZE=quick VTR_TEST_DEVICE=cpu OUT=/tmp bash eval/gpu_check.sh
set -uo pipefail
OUT=${OUT:-.}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-}               # the bench's --size; empty: its default for the device (7b on CUDA)
WORK=/tmp/gpu-check
mkdir -p "$WORK"
trap 'tar czf "$OUT/gpu-check.tar.gz" -C /tmp gpu-check' EXIT
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1 ||
    { cat "$WORK/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u; } | tee "$WORK/machine.txt"
step() {          # step NAME SECONDS COMMAND...: a step that overruns is stopped, the next one still runs
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    echo "$name: rc $? in $((SECONDS - start)) s" | tee -a "$WORK/steps.txt"
}
flash=sdpa
python3 -c "import flash_attn" 2> /dev/null && flash=flash_attention_2
step tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
bench="python3 -m vtr.cli bench --device $DEVICE ${SIZE:+--size $SIZE} --repeats 3"
quick=; [ "$SIZE" = quick ] && quick=--quick
step kernels 60 python3 -m vtr.cli bench --kernels --device "$DEVICE" $quick --out "$WORK/kernels.json"
step llava 100 $bench --out "$WORK/llava.json" --plot "$WORK/llava.png"
step qwen 80 $bench --arch qwen2.5-vl --out "$WORK/qwen.json"
step next 90 $bench --arch llava-next --attn "$flash" --out "$WORK/next.json"
step video 110 $bench --video --out "$WORK/video.json"
tail -n 3 "$WORK"/*.log
