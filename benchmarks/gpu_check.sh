#!/usr/bin/env bash
# The checks that need a GPU, as one command for a lent GPU machine (one NVIDIA H200, this workplace's
# 'cuda' image: python3 with torch, onnx, onnxruntime, scikit-learn, safetensors, pytest; no registry
# can be reached from it, see /work/.library/device/). Writes JSON for BENCHMARKS.md under $OUT:
#
#   environment.json        GPU, python, torch, onnxruntime and its providers, what was installed and how
#   pytest_gpu.txt          `pytest -m gpu` (the fp16 file on CUDAExecutionProvider, tests/test_quantize.py)
#   bench_training.json     one training step on CUDA, FoRDE vs DE and fused vs a loop (bench_training.py):
#                           the digits CNN (M = 8, batch 128) and ResNet18 on 3x32x32 (M = 10, batch 128)
#   bench_inference.json    the fused graph vs M sessions vs torch eager on the CUDA provider (bench_inference.py)
#   bench_quantize.json     fp16 vs float32 predict files on the CUDA provider, interleaved (bench_quantize.py)
#   summary.json            each step: ok / failed (exit code) / skipped (why), and its seconds
#   log.txt                 everything else the steps printed
#
# Every step has a time limit, and all of them one deadline (GPU_CHECK_SECONDS, default 500 s), so the
# command ends inside one device call (600 s) with what it measured; a step that fails does not stop the rest.
#
# Usage:
#   here (a machine with pip and PyPI), once, before the device call:
#       bash benchmarks/gpu_check.sh --fetch-wheels      # the wheels the image lacks (2.8 MB), into .whl/
#   on the device (carry: [".whl"]; timeout_s 600; it keeps itself under about 8 minutes):
#       bash benchmarks/gpu_check.sh
#   here, to check the plumbing on the CPU (tiny sizes; GPU steps skip or run on the CPU, saying so):
#       PYTHON=.venv/bin/python OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh --cpu-dry-run
#
# onnxruntime's CUDA provider needs the onnxruntime-gpu wheel (a few hundred MB: more than a device call
# carries). Where the image's onnxruntime has no CUDAExecutionProvider, the script tries `pip install
# onnxruntime-gpu` (in case a registry answers) and otherwise skips the provider's steps, saying why.
set -uo pipefail

MODE=device
case "${1:-}" in
  --cpu-dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  "") ;;
  *) echo "gpu_check.sh: expected no argument, --cpu-dry-run or --fetch-wheels, got '$1'" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"

if [ "$MODE" = fetch ]; then
  # pydantic is what the image lacks among the training side's imports (training.config); the rest is there.
  # The versions of the development venv (typing-extensions too: pydantic needs a recent one).
  # .whl/ is git-ignored (.gitignore), so the device call takes it only when `carry` names it.
  mkdir -p .whl
  for spec in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
      typing-extensions==4.16.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$spec" || exit 1
  done
  ls -l .whl
  exit 0
fi

OUT="${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
mkdir -p "$OUT"
echo "gpu_check.sh ($MODE): writing to $OUT"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-500}))
LOG="$OUT/log.txt"
: > "$LOG"
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK" "$SUMMARY"' EXIT
export PYTHONUNBUFFERED=1

note() { echo "== $*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; }  # step, status, seconds, detail

# step NAME SECONDS STDOUT COMMAND...: run it under min(SECONDS, what the deadline leaves), its stdout into
# STDOUT (a benchmark's JSON; "-" for the log), its stderr into the log, and record how it went.
step() {
  local name="$1" limit="$2" stdout="$3"
  shift 3
  local left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 "no time left before the ${GPU_CHECK_SECONDS:-500}s deadline"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  [ "$stdout" = - ] && stdout="$LOG"
  note "$name (at most ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$stdout" 2>> "$LOG"
  local code=$?
  local took=$((SECONDS - start))
  if [ $code -eq 0 ]; then
    record "$name" ok "$took" ""
  elif [ $code -eq 124 ] || [ $code -eq 137 ]; then
    record "$name" failed "$took" "stopped at its ${limit}s limit"
  else
    record "$name" failed "$took" "exit code $code (see log.txt)"
  fi
  return $code
}

# --- environment: the project from this checkout, the carried wheels first on the path --------------------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  step install-wheels 60 - "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl && export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
# The console script `forde` and the forde.commands entry points (the tests' `forde` subprocesses need them).
if [ "$MODE" = device ]; then
  step install-project 60 - "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi

providers() { "$PY" -c 'import onnxruntime as o; print(",".join(o.get_available_providers()))' 2>> "$LOG"; }
HAS_CUDA_EP=no
if [ "$MODE" = device ]; then
  if ! providers | grep -q CUDAExecutionProvider; then
    # onnxruntime-gpu in its own folder, first on the path (it is the same `onnxruntime` module as the CPU
    # package), and the CUDA / cuDNN libraries of the nvidia-* packages (torch's) where its loader finds them.
    step install-onnxruntime-gpu 60 - "$PY" -m pip install -q --no-deps --retries 0 --timeout 10 \
      --target "$WORK/ortgpu" onnxruntime-gpu \
      && export PYTHONPATH="$WORK/ortgpu:$PYTHONPATH"
  fi
  NVIDIA_LIBS="$("$PY" -c 'import glob, os, site; print(":".join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/*.so*") + glob.glob(d + "/torch/lib/*.so*")})))' 2>> "$LOG")"
  export LD_LIBRARY_PATH="${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# Present is not enough: the provider must open a session (a CUDA build needs its CUDA major version).
if "$PY" - >> "$LOG" 2>&1 <<'EOF'
import onnx, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
print("CUDAExecutionProvider opens a session")
EOF
then HAS_CUDA_EP=yes; fi

"$PY" - "$OUT/environment.json" "$MODE" "$HAS_CUDA_EP" >> "$LOG" 2>&1 <<'EOF'
import json, platform, shutil, subprocess, sys
found = {"mode": sys.argv[2], "cuda_execution_provider_runs": sys.argv[3] == "yes", "python": sys.version.split()[0],
         "platform": platform.platform()}
try:
    import torch
    found |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except ImportError as err:
    found["torch"] = f"not importable: {err}"
try:
    import onnxruntime as ort
    found |= {"onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
              "providers": ort.get_available_providers()}
except ImportError as err:
    found["onnxruntime"] = f"not importable: {err}"
if shutil.which("nvidia-smi"):
    found["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
json.dump(found, open(sys.argv[1], "w"), indent=2)
print(json.dumps(found, indent=2))
EOF

if [ "$MODE" = dry ]; then
  DEVICE=cpu
  TRAINING_SIZES=(--rounds 2 --warmup 1 --members 2 --batch 16)
  RESNET=(--arch resnet18 --input-shape 3 32 32 --members 2 --batch 8 --rounds 1 --warmup 1)
  RUN=(epochs=1 members=2)
  INFERENCE_SIZES=(--rounds 2 --warmup 1 --batches 1 8)
  QUANTIZE=(--precisions fp16 --rounds 3 --time-fp16)
else
  DEVICE=cuda
  TRAINING_SIZES=(--rounds 20 --warmup 3)
  RESNET=(--arch resnet18 --input-shape 3 32 32 --members 10 --batch 128 --rounds 10 --warmup 3)
  RUN=(epochs=3)  # the inference benchmarks need a run of the digits model, not a good one
  INFERENCE_SIZES=(--rounds 30)
  QUANTIZE=(--precisions fp16 --rounds 50 --device cuda)
fi

# --- 1. pytest -m gpu ----------------------------------------------------------------------------------------
# Only the modules that hold gpu tests are collected: the others import what the image lacks (BentoML,
# Selenium, ...). -o filterwarnings= : pyproject's filters name pydantic's and BentoML's warning classes.
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
step pytest-gpu 180 - "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" -q -rs -p no:cacheprovider -o filterwarnings= \
  --junitxml="$WORK/pytest.xml"
"$PY" - "$WORK/pytest.xml" "$OUT/pytest_gpu.txt" >> "$LOG" 2>&1 <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
except (OSError, ET.ParseError) as err:
    open(sys.argv[2], "w").write(f"pytest wrote no report ({err}); see log.txt\n")
    raise SystemExit
lines = [f"tests {suite.get('tests')} failures {suite.get('failures')} errors {suite.get('errors')} "
         f"skipped {suite.get('skipped')} seconds {suite.get('time')}"]
for case in suite.iter("testcase"):
    outcome = next((child.tag + ": " + (child.get("message") or "")[:300] for child in case), "passed")
    lines.append(f"{case.get('classname')}::{case.get('name')}  {outcome}")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# --- 2. one training step on the device: FoRDE vs DE, fused vs loop -------------------------------------------
step bench-training-digits 90 "$WORK/training_digits.json" \
  "$PY" benchmarks/bench_training.py --device "$DEVICE" "${TRAINING_SIZES[@]}"
step bench-training-resnet18 120 "$WORK/training_resnet18.json" \
  "$PY" benchmarks/bench_training.py --device "$DEVICE" "${RESNET[@]}"
"$PY" - "$OUT/bench_training.json" "$WORK/training_digits.json" "$WORK/training_resnet18.json" >> "$LOG" 2>&1 <<'EOF'
import json, pathlib, sys
found = {}
for path in map(pathlib.Path, sys.argv[2:]):
    try:
        found[path.stem] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        found[path.stem] = f"no JSON ({err}); see log.txt"
json.dump(found, open(sys.argv[1], "w"), indent=2)
EOF

# --- 3. a digits run to export (trained on the device), then the CUDA provider -------------------------------
# Through the library rather than `forde train`, so that it needs no installed entry points.
step train-digits 90 - "$PY" -c '
import sys
from training.run import plan_run
from training.trainer import train
overrides = {k: int(v) for k, v in (a.split("=") for a in sys.argv[3:])}
plan = plan_run("training/configs/digits.toml", sys.argv[1], None, device=sys.argv[2], **overrides)
train(plan.config, plan.run_dir, resume=plan.resume, progress=False)
' "$WORK/run" "$DEVICE" "${RUN[@]}"
if [ "$MODE" = device ] && [ "$HAS_CUDA_EP" != yes ]; then
  reason="onnxruntime has no working CUDAExecutionProvider here (see environment.json and log.txt)"
  record bench-inference skipped 0 "$reason"
  record bench-quantize skipped 0 "$reason"
elif [ ! -d "$WORK/run" ]; then
  record bench-inference skipped 0 "no digits run (train-digits failed)"
  record bench-quantize skipped 0 "no digits run (train-digits failed)"
else
  step bench-inference 150 "$OUT/bench_inference.json" \
    "$PY" benchmarks/bench_inference.py "$WORK/run" --device "$DEVICE" "${INFERENCE_SIZES[@]}"
  step bench-quantize 120 "$OUT/bench_quantize.json" "$PY" benchmarks/bench_quantize.py "$WORK/run" "${QUANTIZE[@]}"
fi

"$PY" - "$SUMMARY" "$OUT/summary.json" <<'EOF' | tee -a "$LOG"
import json, sys
steps = [dict(zip(("step", "status", "seconds", "detail"), line.rstrip("\n").split("\t")))
         for line in open(sys.argv[1]) if line.strip()]
for s in steps:
    s["seconds"] = int(s["seconds"])
json.dump({"steps": steps}, open(sys.argv[2], "w"), indent=2)
print(json.dumps({"steps": steps}, indent=2))
EOF
grep -q $'\tfailed\t' "$SUMMARY" && exit 1
exit 0
