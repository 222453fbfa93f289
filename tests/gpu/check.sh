#!/usr/bin/env bash
# GPU acceptance (issue 15 §3), one command from anywhere:   bash tests/gpu/check.sh
#
#   1. the CUDA-marked tests (pytest -m cuda): bf16 and fp16 autocast with the GradScaler, exact resume on the GPU,
#      pinned-memory loading, fsdp against ddp on the visible GPUs           -> results/gpu_tests.json
#   2. log-mel on the GPU against the CPU; the GPU's measured bf16 matmul rate  -> results/gpu_features.json
#   3. whisper-base on the shared corpus, bf16, 50 steps, against the Hugging Face course recipe at the same
#      settings: samples/s, peak GPU memory, WER before/after, achieved FLOP/s as a fraction of the bf16 matmul
#      rate                                                                     -> results/gpu_vs_hf.json
#
# Without a CUDA GPU it stops at once with one line (exit status 1). PYTHON picks the interpreter (default: the
# repository's .venv, else python3); STEPS (default 50) and BATCH (default 16) size step 3, BENCH_ARGS adds
# arguments to tests/bench/bench_vs_hf.py, RESULTS is the output folder. CHECK_DEVICE=cpu is a dry run of this
# script on the CPU (float32; give small STEPS, BENCH_ARGS and another RESULTS). Exit status 0 only when every
# step passed; otherwise one line names the steps that failed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEVICE="${CHECK_DEVICE:-cuda}"
PRECISION=bf16
if [ "$DEVICE" = cpu ]; then
    PRECISION=fp32
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "tests/gpu/check.sh: no CUDA GPU visible to torch ($PY): nothing was checked" >&2
    exit 1
fi
export CUBLAS_WORKSPACE_CONFIG=:4096:8 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RESULTS="${RESULTS:-tests/bench/results}"
mkdir -p "$RESULTS"
failed=()
start=$(date +%s)

echo "== 1/3 CUDA-marked tests"
junit=$(mktemp)
ASR_TEST_DEVICE="$DEVICE" "$PY" -m pytest -m cuda tests -q -p no:cacheprovider --junitxml="$junit" ||
    failed+=("cuda tests")
"$PY" - "$junit" "$RESULTS/gpu_tests.json" <<'EOF' || failed+=("gpu_tests.json")
import json, sys, xml.etree.ElementTree as ET

import torch

cases = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0))})
gpu = torch.cuda.is_available()
summary = {"device": torch.cuda.get_device_name() if gpu else "cpu", "gpus": torch.cuda.device_count(),
           "torch": torch.__version__,
           "cases": cases, **{k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}}
open(sys.argv[2], "w").write(json.dumps(summary, indent=1))
print(f"{summary['passed']} passed, {summary['failure'] + summary['error']} failed, {summary['skipped']} skipped "
      f"on {summary['device']} x {summary['gpus']}")
sys.exit(1 if summary["failure"] + summary["error"] or not summary["passed"] else 0)
EOF
rm -f "$junit"

echo "== 2/3 log-mel GPU vs CPU, bf16 matmul rate"
"$PY" tests/gpu/bench_gpu.py --device "$DEVICE" --out "$RESULTS/gpu_features.json" || failed+=("bench_gpu")

echo "== 3/3 whisper-base $PRECISION, ${STEPS:-50} steps, against the Hugging Face course recipe"
if ! "$PY" -c 'import accelerate' >/dev/null 2>&1; then  # the Trainer of the reference side needs it
    echo "step 3 needs accelerate for the Hugging Face Trainer: pip install 'accelerate>=1.10' (the bench extra)" >&2
    failed+=("bench_vs_hf (accelerate not installed)")
else
    # shellcheck disable=SC2086  # BENCH_ARGS: several arguments
    "$PY" tests/bench/bench_vs_hf.py --device "$DEVICE" --precision "$PRECISION" --steps "${STEPS:-50}" \
        --batch "${BATCH:-16}" --workers 4 --work /tmp/asr-gpu-check --out "$RESULTS/gpu_vs_hf.json" \
        ${BENCH_ARGS:-} || failed+=("bench_vs_hf")
fi

echo "== $(( $(date +%s) - start )) s; results in $RESULTS/gpu_*.json"
if [ ${#failed[@]} -gt 0 ]; then
    echo "tests/gpu/check.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "tests/gpu/check.sh: all passed"
