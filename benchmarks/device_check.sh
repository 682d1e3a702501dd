#!/usr/bin/env bash
# One prepared GPU check (H200, no network) for issues 15 and 16, run from the repository root; it ends within
# BUDGET_S (540) seconds of wall time even if a part hangs:
#   OUT=/some/folder COMFYUI_PATH=$PWD/.host/ComfyUI bash benchmarks/device_check.sh
# On the device machine (run tool, carry [".host", ".whl"], both made by `python tools/device_bundle.py`: the
# trimmed host ComfyUI tree and the wheels the machine lacks, av and torchsde), as one command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.host/ComfyUI timeout 590 bash benchmarks/device_check.sh
# TINY=1 runs every part with scaled-down models on any device (the CPU tests use it): same plumbing, no
# BENCHMARKS.md write. BUDGET_S (540) and REPEATS (3) can be lowered for such checks.
#
# Parts, in order; each under a hard `timeout` of min(its cap, what is left of the budget less 15 s for the end):
# 1. NegToMe per-layer kernel against the released maths (benchmarks/negtome_overhead.py), cap 50 s.
# 2. benchmarks/gpu.py, one model per part, random-weight full-size models in bf16, every method warmed once,
#    then 3 timed runs each in rotated order (estimates from the last H200 run; arithmetic in gpu.py):
#    - SDXL 1024² batch 4, 20 steps: CFG, cond only, AG latching at 50%/30%, AG with images latching at
#      30/40/50/60% (per-row uncond), LinearAG, NegToMe defaults (~60 s; cap 80 s).
#    - Flux-dev 1024² batch 4, 10 steps: CFG, NegToMe defaults (~95 s; cap 110 s).
#    - Wan 2.1 T2V 1.3B 832x480x33 frames batch 1, 8 steps: CFG, cond only, AG 50%/30%, LinearAG; CFG and
#      NegToMe at batch 2 (~75 s; cap 90 s).
#    - Qwen-Image 1024² batch 1, 8 steps: the same rows (~75 s; cap 90 s).
#    - Wan 2.1 T2V 14B 832x480x33 frames batch 1, 4 steps: CFG, cond only, AG 50%, LinearAG (~115 s; what is
#      left, cap 130 s). No NegToMe row on 14B: at batch 2 it would add ~35 s a round (the 1.3B row has the same
#      14 040 tokens per clip).
#    Warm-up runs: 3 steps (LinearAG's first estimated step is step 1 < half of 3); the per-image row warms at 20.
#    gpu.py rewrites its JSON after every timed round: a part stopped by its limit keeps its finished rounds.
# 3. BENCHMARKS.md's GPU section written from the saved JSONs (gpu.py --render ... --write), never by hand.
# 4. The summary of the targets (benchmarks/gpu_summary.py): NegToMe default <= 1.02x CFG on SDXL and <= 1.03x on
#    Flux; AG/LinearAG time ratio <= evaluation ratio + 0.03, with the floor-implied ratio beside it; the kernel
#    <= 1.2x the released maths; evaluation counts as scheduled; every part finished.
#
# Everything lands in $OUT: device.txt, parts.txt, negtome_kernel.{md,json,log}, gpu_<model>.{md,json,log},
# gpu.md (the section), summary.{md,json}, and BENCHMARKS.md as rewritten (copy it over the repository's after
# the run). ComfyUI is not downloaded (no network): COMFYUI_PATH (default $PWD/.host/ComfyUI) must hold a ComfyUI
# tree whose requirements this python imports.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
export COMFYUI_PATH=${COMFYUI_PATH:-$ROOT/.host/ComfyUI}
PY=${PYTHON:-python3}
TINY=${TINY:-0}
BUDGET_S=${BUDGET_S:-540}
REPEATS=${REPEATS:-3}
RESERVE_S=15
START=$(date +%s)
: > "$OUT/parts.txt"

if [ ! -f "$COMFYUI_PATH/comfy/model_management.py" ] || [ ! -f "$COMFYUI_PATH/nodes.py" ]; then
    echo "device_check: no ComfyUI tree at COMFYUI_PATH=$COMFYUI_PATH (this machine has no network; carry a" \
         "ComfyUI checkout there, e.g. the one tools/host.py brought, with its requirements installed)" >&2
    exit 3
fi
if ! TINY=$TINY "$PY" - > "$OUT/import_check.log" 2>&1 <<'EOF'
# what the benchmarks import: ComfyUI in this process (GPU allowed), its top-level nodes, the pack's modules
import os
import sys
sys.path.insert(0, "benchmarks")
import torch
tiny = os.environ.get("TINY") == "1"
assert tiny or torch.cuda.is_available(), "no CUDA device visible to torch"
import _host
_host.setup(cpu=not torch.cuda.is_available())
_host.host.pack_module("benchmarks.harness")
_host.host.pack_module("nodes.negtome")
import comfy.supported_models  # noqa: F401
print("torch", torch.__version__, "cuda", torch.version.cuda, "ComfyUI at", _host.host.find_comfyui())
EOF
then
    echo "device_check: the ComfyUI tree at $COMFYUI_PATH does not import with $PY (or no CUDA); see" \
         "$OUT/import_check.log:" >&2
    tail -5 "$OUT/import_check.log" >&2
    exit 3
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; "$PY" -c \
  "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; } > "$OUT/device.txt"

elapsed() { echo $(($(date +%s) - START)); }

# run_part NAME CAP_SECONDS COMMAND...: stdout to $OUT/NAME.md, stderr to $OUT/NAME.log, status to parts.txt
run_part() {
    local name=$1 cap=$2
    shift 2
    local left=$((START + BUDGET_S - RESERVE_S - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        echo "== $name skipped: $left s left ($(elapsed) s)"
        echo "$name -1 0" >> "$OUT/parts.txt"
        return
    fi
    echo "== $name, limit $limit s ($(elapsed) s)"
    local t0
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
    local status=$?
    echo "$name $status $(($(date +%s) - t0))" >> "$OUT/parts.txt"
    echo "$name exit $status"
    cat "$OUT/$name.md"
    [ "$status" -eq 0 ] || tail -3 "$OUT/$name.log"
}

if [ "$TINY" = 1 ]; then
    TINYFLAG=(--tiny); KERNEL=(--tiny --iters 2 --rounds 1); VIDEO=(); IMAGE1024=()
else
    TINYFLAG=(); KERNEL=(--iters 10 --rounds 3); VIDEO=(--size 832x480x33); IMAGE1024=(--size 1024)
fi
GPU=("$PY" benchmarks/gpu.py "${TINYFLAG[@]}" --repeats "$REPEATS")

run_part negtome_kernel 50 "$PY" benchmarks/negtome_overhead.py "${KERNEL[@]}" --json "$OUT/negtome_kernel.json"
run_part gpu_sdxl 80 "${GPU[@]}" --models sdxl "${IMAGE1024[@]}" --batch 4 --steps 20 --warm-steps 3 \
    --only ag,ag_per_image,linear_ag,negtome --json "$OUT/gpu_sdxl.json"
run_part gpu_flux 110 "${GPU[@]}" --models flux "${IMAGE1024[@]}" --batch 4 --steps 10 --warm-steps 3 \
    --only negtome --no-floor flux --json "$OUT/gpu_flux.json"
run_part gpu_wan1.3b 90 "${GPU[@]}" --models wan1.3b "${VIDEO[@]}" --batch 1 --negtome-batch 2 --steps 8 \
    --warm-steps 3 --only ag,linear_ag,negtome --json "$OUT/gpu_wan1.3b.json"
run_part gpu_qwen 90 "${GPU[@]}" --models qwen "${IMAGE1024[@]}" --batch 1 --negtome-batch 2 --steps 8 \
    --warm-steps 3 --only ag,linear_ag,negtome --json "$OUT/gpu_qwen.json"
run_part gpu_wan14b 130 "${GPU[@]}" --models wan14b "${VIDEO[@]}" --batch 1 --steps 4 --warm-steps 3 \
    --only ag50,linear_ag --json "$OUT/gpu_wan14b.json"

echo "== BENCHMARKS.md GPU section ($(elapsed) s)"
shopt -s nullglob
SAVED=("$OUT"/gpu_*.json)
if [ "${#SAVED[@]}" -eq 0 ]; then
    echo "no gpu_*.json saved: BENCHMARKS.md left as it is"
elif [ "$TINY" = 1 ]; then
    timeout 60 "$PY" benchmarks/gpu.py --render "${SAVED[@]}" > "$OUT/gpu.md" 2> "$OUT/render.log"
    echo "render exit $? (TINY: BENCHMARKS.md not written)"
else
    timeout 60 "$PY" benchmarks/gpu.py --render "${SAVED[@]}" --write > "$OUT/gpu.md" 2> "$OUT/render.log"
    echo "render exit $?"
    cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
fi
cat "$OUT/gpu.md" 2>/dev/null

echo "== summary ($(elapsed) s)"
timeout 30 "$PY" benchmarks/gpu_summary.py "$OUT"
echo "device_check: done in $(elapsed) s; results in $OUT"
