#!/usr/bin/env bash
# GPU readiness check (issue 10, point 5): on a CUDA machine, from a fresh copy of the repository,
# in under 5 minutes, with MLflow tracking off (SEED_TRACKING=0):
#   1. install the packages the machine's Python lacks, from wheels in --wheels DIR (no index);
#   2. the step benchmark (bench/bench_step.py) at ImageNet shapes (R-50 -> R-18, 224 px,
#      batch 32, K 65,536) and at the default ones, with AMP (fp16 + GradScaler): img/s, peak
#      GPU memory, overhead = full / (teacher + student + queue floor), speedup vs the released
#      formulation;
#   3. 30 steps of the real `distill` stage under `torchrun --nproc_per_node 1`, batch 128,
#      224 px, 14 loader workers, on shards made by stages/shards.py from a TSV of ImageNet-like
#      500x375 JPEGs cut from the photos that ship in scikit-learn and matplotlib
#      (bench/bench_loader.py's `photo_jpegs`), twice: with the colour ops and blur on the GPU
#      (data.colour_on: device, what auto picks on CUDA) and in the loader workers (cpu); its
#      data_wait_fraction says whether the loader feeds the GPU;
#   4. the kNN benchmark with a 1,281,167 x 128 bank and 50,000 queries (bench/bench_knn.py);
#   5. a summary JSON (last line of the output; everything is also kept in --workdir).
#
# The machine's Python is expected to have torch, torchvision, timm and safetensors. What else the
# check imports (webdataset, braceexpand, PyYAML, numpy, Pillow, OpenCV, tqdm) is installed from
# --wheels when missing, into --workdir/pydeps (the machine's own site-packages are left alone).
# Fill the folder on a machine with internet access, for the GPU machine's Python version, e.g.
# 3.11:
#
#   pip download --only-binary=:all: --no-deps --python-version 3.11 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_28_x86_64 -d wheels \
#       webdataset==1.0.2 braceexpand PyYAML==6.0.4 numpy==2.4.6 pillow==13.0.0 tqdm==4.70.1 \
#       opencv-python-headless==5.1.0.95
#
# (or `pip download -d wheels webdataset braceexpand PyYAML numpy pillow tqdm
# opencv-python-headless` on a machine with the same Python and platform). Then, on the GPU
# machine:
#
#   bash bench/gpu_check.sh --wheels wheels
#
# --dry-run runs the same steps on the CPU at tiny sizes (CI: tests/test_gpu_check.py).
#
# Usage: bench/gpu_check.sh [--wheels DIR] [--workdir DIR] [--dry-run]
#        environment: PYTHON (default python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS=""
WORK=""
DRY_RUN=0

usage() { sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
    --wheels=*) WHEELS="${1#*=}"; shift ;;
    --workdir) WORK="${2:?--workdir needs a directory}"; shift 2 ;;
    --workdir=*) WORK="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
export SEED_TRACKING=0 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
# the stages import seed_core from the repository (nothing is installed in the machine's Python)
export PYTHONPATH="$WORK/pydeps:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
fi

started=$SECONDS
say() { echo "[gpu_check $((SECONDS - started))s] $*" >&2; }

# ---------------------------------------------------------------- 1. packages
MODULES="webdataset:webdataset braceexpand:braceexpand yaml:PyYAML numpy:numpy PIL:pillow
         cv2:opencv-python-headless tqdm:tqdm torch:torch timm:timm safetensors:safetensors"
# one interpreter tries every import (each start costs seconds) and prints the missing packages
# shellcheck disable=SC2086
read -r -a missing <<< "$("$PYTHON" - $MODULES <<'PY'
import importlib
import importlib.util
import sys

HEAVY = {"torch", "timm"}  # seconds to import: looked up only
missing = []
for pair in sys.argv[1:]:
    module, package = pair.split(":")
    try:
        if module in HEAVY:
            if importlib.util.find_spec(module) is None:
                raise ImportError(module)
        else:
            importlib.import_module(module)
    except ImportError:
        missing.append(package)
print(" ".join(missing))
PY
)"
if [ "${#missing[@]}" -gt 0 ]; then
  for package in "${missing[@]}"; do
    case "$package" in torch|timm|safetensors)
      echo "gpu_check.sh: $PYTHON lacks $package, which the machine should provide" >&2; exit 1 ;;
    esac
  done
  if [ -z "$WHEELS" ]; then
    echo "gpu_check.sh: $PYTHON lacks ${missing[*]}; pass --wheels DIR with their wheels" \
         "(see the pip download command in bench/gpu_check.sh --help)" >&2
    exit 1
  fi
  say "installing ${missing[*]} from $WHEELS into $WORK/pydeps"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" \
    --target "$WORK/pydeps" "${missing[@]}"
fi
if ! "$PYTHON" -c "import sys, torch
cuda = torch.cuda.is_available()
print('torch', torch.__version__, torch.cuda.get_device_name() if cuda else 'no CUDA device',
      file=sys.stderr)
sys.exit(0 if cuda or sys.argv[1] == '1' else 1)" "$DRY_RUN"; then
  echo "gpu_check.sh: torch sees no CUDA device; on a CPU machine use --dry-run" >&2
  exit 1
fi

# ---------------------------------------------------------------- sizes
if [ "$DRY_RUN" = 1 ]; then
  STEP_ARGS=(--teacher resnet10t --student resnet10t --batch 8 --size 16 --queue 64
             --imagenet-teacher resnet10t --imagenet-student resnet10t --imagenet-batch 4
             --imagenet-size 32 --imagenet-queue 64 --queues --warmup 0 --repeats 1)
  # faiss is a CPU-side reference the GPU machine lacks: leave it out here too
  KNN_ARGS=(--bank 3000 --queries 200 --classes 10 --check-queries 50 --skip-faiss)
  TEACHER=resnet10t STUDENT=resnet10t SIDE=24 IMAGE=16 BATCH=4 STEPS=3 QUEUE=64 WORKERS=0
else
  STEP_ARGS=(--cases imagenet default --warmup 3 --repeats 10)
  KNN_ARGS=()
  TEACHER=resnet50 STUDENT=resnet18 SIDE=0 IMAGE=224 BATCH=128 STEPS=30 QUEUE=65536
  WORKERS=$("$PYTHON" -c "import os; print(max(1, min(14, (os.cpu_count() or 2) - 2)))")
fi

# ---------------------------------------------------------------- 2. the step
say "step benchmark"
"$PYTHON" "$ROOT/bench/bench_step.py" "${STEP_ARGS[@]}" > "$WORK/step.json"

# ---------------------------------------------------------------- 3. the distill stage
say "data: $((BATCH * STEPS)) images ($([ "$SIDE" = 0 ] && echo "500x375 photo JPEGs" || \
  echo "synthetic, ${SIDE} px")), a random $TEACHER teacher"
"$PYTHON" - "$WORK" "$TEACHER" "$STUDENT" "$SIDE" "$IMAGE" "$BATCH" "$STEPS" "$QUEUE" \
    "$WORKERS" "$ROOT" <<'EOF'
import io
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from seed_core.data.tsv import write_tsv
from seed_core.models.encoder import build_encoder
from seed_core.teachers.canonical import save_encoder

work = Path(sys.argv[1])
teacher, student, side, image, batch, steps, queue, workers = (
    sys.argv[2], sys.argv[3], *map(int, sys.argv[4:10]))
rng = np.random.default_rng(0)


def rows():
    if side == 0:  # ImageNet-like photos (the GPU run)
        sys.path.insert(0, str(Path(sys.argv[10]) / "bench"))
        from bench_loader import photo_jpegs

        for i, jpeg in enumerate(photo_jpegs(batch * steps)):
            yield f"img_{i:06d}", i % 10, jpeg
        return
    for i in range(batch * steps):  # tiny synthetic JPEGs (--dry-run)
        coarse = rng.integers(0, 256, (max(2, side // 16),) * 2 + (3,), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((side, side), Image.BILINEAR).save(buffer, "JPEG")
        yield f"img_{i:06d}", i % 10, buffer.getvalue()


write_tsv(work / "train.tsv", rows())
torch.manual_seed(0)
save_encoder(work / "teacher" / "teacher.safetensors", build_encoder(teacher, False, 128),
             fmt="moco_v2")
for colour_on in ("device", "cpu"):  # the colour ops and blur on the GPU, or in the workers
    params = {"data": {"image_size": image, "workers": workers, "colour_on": colour_on},
              "student": {"arch": student},
              "distill": {"epochs": 1, "batch_size": batch, "queue_size": queue, "log_every": 5,
                          "checkpoint_every": 10_000, "warmup_epochs": 0.0}}
    (work / f"params-{colour_on}.yaml").write_text(yaml.safe_dump(params))
EOF
# at least two shards per loader worker, so that every worker has shards to read
SHARDS=$((WORKERS > 0 ? 2 * WORKERS : 2))
"$PYTHON" "$ROOT/stages/shards.py" --tsv "$WORK/train.tsv" --out "$WORK/shards" \
  --shard-size $(((BATCH * STEPS + SHARDS - 1) / SHARDS)) --workers 1 \
  --params "$WORK/untracked.yaml" >&2
for COLOUR_ON in device cpu; do
  say "distill: $STEPS steps of $TEACHER -> $STUDENT, batch $BATCH, ${IMAGE} px, K $QUEUE," \
      "colour ops on the $COLOUR_ON"
  (cd "$WORK" && "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
    "$ROOT/stages/distill.py" --teacher "$WORK/teacher" --shards "$WORK/shards" \
    --out "$WORK/student-$COLOUR_ON" --curves "$WORK/distill-$COLOUR_ON.csv" \
    --metrics "$WORK/distill-$COLOUR_ON.json" --params "$WORK/params-$COLOUR_ON.yaml" \
    --checkpoint-dir "$WORK/ckpt-$COLOUR_ON" --no-mlflow-model >&2)
done

# ---------------------------------------------------------------- 4. kNN
say "kNN benchmark"
"$PYTHON" "$ROOT/bench/bench_knn.py" "${KNN_ARGS[@]}" > "$WORK/knn.json"

# ---------------------------------------------------------------- 5. summary
say "done in $((SECONDS - started)) s; outputs in $WORK"
"$PYTHON" - "$WORK" "$((SECONDS - started))" "$DRY_RUN" "$BATCH" "$WORKERS" \
    "$([ "$SIDE" = 0 ] && echo "500x375 photo JPEGs, ${IMAGE} px views" || echo "synthetic")" \
    <<'EOF'
import json
import sys
from pathlib import Path

work, seconds, dry_run = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
step = json.loads((work / "step.json").read_text())
distill = {colour_on: json.loads((work / f"distill-{colour_on}.json").read_text())
           for colour_on in ("device", "cpu")}
knn = json.loads((work / "knn.json").read_text())
cases = step["cases"]
summary = {
    "check": "gpu", "dry_run": dry_run, "seconds": seconds, "machine": step["machine"],
    "torch": step["torch"],
    "step": {name: {"images_per_s": round(case["images_per_s"]["full_step"], 1),
                    "reference_images_per_s": round(case["images_per_s"]["reference_step"], 1),
                    "overhead": round(case["overhead"], 3),
                    "speedup_vs_reference": round(case["speedup_vs_reference"], 3),
                    "peak_gpu_mib": case["seconds"]["full_step"].get("peak_gpu_mib")}
             for name, case in cases.items()},
    # data.colour_on: auto puts the colour ops on the GPU ("distill"); "distill_colour_on_cpu"
    # is the same run with them in the loader workers
    **{name: {**{key: distill[colour_on].get(key)
                 for key in ("steps_run", "images_per_s", "data_wait_fraction", "final_loss",
                             "seconds")},
              "batch": int(sys.argv[4]), "workers": int(sys.argv[5]), "images": sys.argv[6],
              "colour_on": colour_on}
       for name, colour_on in (("distill", "device"), ("distill_colour_on_cpu", "cpu"))},
    "knn": {"seconds": knn["ours"]["seconds"], "peak_extra_mib": knn["ours"]["peak_extra_mib"],
            "memory_method": knn["ours"]["memory_method"],
            "bank": knn["bank"], "queries": knn["queries"],
            "recall_vs_exact": knn["agreement"].get("recall_vs_exact_ours")},
    "workdir": str(work),
}
print(json.dumps(summary))
EOF
