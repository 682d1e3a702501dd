#!/usr/bin/env bash
# One prepared GPU check (H200, no network), run from the repository root in under 8 minutes:
#   OUT=/some/folder COMFYUI_PATH=$PWD/.host/ComfyUI bash benchmarks/device_check.sh
#
# 1. NegToMe per-layer kernel against the released maths (4x1024x1280, 4x4096x640, 4x4096x3072; one CFG chunk and
#    a whole 8-row call; similarity model (default), fp32, checked): benchmarks/negtome_overhead.py.
# 2. benchmarks/gpu.py --write: SDXL 1024² batch 4, 20 steps (CFG, cond only, AG latching at 50%/30%, LinearAG,
#    NegToMe at each similarity: model (default), fp32, checked) and Flux-dev 1024² batch 4, 10 steps (CFG, cond
#    only, NegToMe model and fp32), random-weight full-size models in bf16; every method warmed once, then 3 timed
#    runs each in rotated order (expected: about 1.5 min SDXL, 4 min Flux).
# 3. A summary of the targets (NegToMe default <= 1.02x CFG on SDXL and <= 1.03x on Flux; AG/LinearAG time ratio
#    <= evaluation ratio + 0.03; the default kernel <= 1.2x the released maths).
#
# Everything lands in $OUT: negtome_kernel.{md,json}, gpu.{md,json}, summary.{md,json}, device.txt, the logs, and
# BENCHMARKS.md as rewritten by gpu.py --write (copy it over the repository's after the run).
# ComfyUI is not downloaded (no network): COMFYUI_PATH (default $PWD/.host/ComfyUI) must hold a ComfyUI tree
# whose requirements this python imports.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
export COMFYUI_PATH=${COMFYUI_PATH:-$ROOT/.host/ComfyUI}
PY=${PYTHON:-python3}
START=$(date +%s)

if [ ! -f "$COMFYUI_PATH/comfy/model_management.py" ] || [ ! -f "$COMFYUI_PATH/nodes.py" ]; then
    echo "device_check: no ComfyUI tree at COMFYUI_PATH=$COMFYUI_PATH (this machine has no network; carry a" \
         "ComfyUI checkout there, e.g. the one tools/host.py brought, with its requirements installed)" >&2
    exit 3
fi
if ! "$PY" - > "$OUT/import_check.log" 2>&1 <<'EOF'
# what the benchmarks import: ComfyUI in this process (GPU allowed), its top-level nodes, the pack's modules
import sys
sys.path.insert(0, "benchmarks")
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
import _host
_host.setup(cpu=False)
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

echo "== 1/3 NegToMe per-layer kernel ($(($(date +%s) - START)) s)"
timeout 55 "$PY" benchmarks/negtome_overhead.py --iters 10 --rounds 3 --json "$OUT/negtome_kernel.json" \
    > "$OUT/negtome_kernel.md" 2> "$OUT/negtome_kernel.log"
echo "negtome_overhead.py exit $?"; cat "$OUT/negtome_kernel.md"

echo "== 2/3 sampling runs, SDXL and Flux ($(($(date +%s) - START)) s)"
timeout 400 "$PY" benchmarks/gpu.py --models sdxl,flux --steps sdxl=20,flux=10 --repeats 3 --warm-steps 3 \
    --only "sdxl=ag+linear_ag+negtome+negtome_other,flux=negtome" --write --json "$OUT/gpu.json" \
    > "$OUT/gpu.md" 2> "$OUT/gpu.log"
echo "gpu.py exit $?"; cat "$OUT/gpu.md"; tail -3 "$OUT/gpu.log"
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"

echo "== 3/3 summary ($(($(date +%s) - START)) s)"
"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
lines, checks = [], []


def check(name, value, limit, ok):
    checks.append(dict(check=name, value=value, limit=limit, ok=ok))
    lines.append(f"| {name} | {value} | {limit} | {'yes' if ok else 'NO'} |")


try:
    gpu = json.loads((out / "gpu.json").read_text())["results"]
except Exception as e:  # noqa: BLE001
    gpu = {}
    lines.append(f"gpu.json missing or unreadable: {e}")
for family, limit in (("sdxl", 1.02), ("flux", 1.03)):
    for row in gpu.get(family, {}).get("rows", []):
        name = row["method"]
        if "NegToMe" in name:
            target = limit if "pack defaults" in name else None
            check(f"{family} {name}: time / CFG", f"{row['ratio']:.3f}", "-" if target is None else f"<= {target}",
                  True if target is None else row["ratio"] <= target)
        elif name.startswith(("AG", "LinearAG")):
            check(f"{family} {name}: time / CFG vs eval ratio", f"{row['ratio']:.3f} vs {row['eval_ratio']:.3f}",
                  "<= eval ratio + 0.03", row["ratio"] <= row["eval_ratio"] + 0.03)
try:
    kernel = json.loads((out / "negtome_kernel.json").read_text())
    for row in kernel["rows"]:
        default = kernel.get("default_similarity", "model")
        if row["setting"] in ("checked", "model"):
            check(f"kernel {row['shape']} {row['rows']} rows, {row['setting']}: / released maths",
                  f"{row['ratio']:.2f}", "<= 1.2" if row["setting"] == default else "-",
                  row["ratio"] <= 1.2 if row["setting"] == default else True)
        if row["setting"] == default:
            check(f"kernel {row['shape']} {row['rows']} rows: largest similarity block (MiB)",
                  f"{row['largest_block_mib']:.0f}", "<= 64", row["largest_block_mib"] <= 64)
except Exception as e:  # noqa: BLE001
    lines.append(f"negtome_kernel.json missing or unreadable: {e}")
text = "\n".join(["| check | value | target | met |", "|---|---|---|---|"] + lines)
(out / "summary.md").write_text(text + "\n")
(out / "summary.json").write_text(json.dumps(checks, indent=1))
print(text)
EOF
echo "device_check: done in $(($(date +%s) - START)) s; results in $OUT"
