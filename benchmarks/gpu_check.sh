#!/usr/bin/env bash
# One command for a lent GPU machine (no network): build flexkern in place, run the GPU tests and
# the benchmarks, and leave logs and results under $OUT. Installs nothing.
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh
#
# Files under $OUT (7): summary.txt build.log gpu_tests.log bench_moe.log bench_moe.json
# bench_moe.png bench_routing.json. Every step has its own time limit and the whole script stays
# within ~8 minutes. A failed build only means the Triton/reference backends are used. On a machine
# without a GPU the GPU steps are skipped and the benchmark runs its small CPU smoke version.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/flexkern_gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the in-place build is importable as is
TOTAL_S="${GPU_CHECK_TOTAL_S:-470}"                   # hard ceiling for all steps together
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# The first interpreter that has torch: $PYTHON, python, python3.
PY=""
for cand in "${PYTHON:-}" python python3; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" 2>/dev/null; then
        PY="$(command -v "$cand")"; break
    fi
done
if [ -z "$PY" ]; then
    say "no python with torch found (set PYTHON=...)"; exit 2
fi

# step NAME LIMIT_S LOG CMD...: run CMD under a time limit (capped by what is left of TOTAL_S),
# output to the terminal and appended to LOG; record the outcome for the summary.
STEPS=()
step() {
    local name="$1" limit="$2" log="$3"; shift 3
    local left=$((TOTAL_S - SECONDS))
    if [ "$left" -lt 15 ]; then
        STEPS+=("$name: skipped (time budget spent)"); return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    echo "=== $name (limit ${limit}s) ===" | tee -a "$log"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
    local what="ok"
    [ "$rc" -ne 0 ] && what="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT after ${limit}s"
    STEPS+=("$name: $what ($((SECONDS - t0)) s)")
    return 0
}

say "flexkern GPU check — $(date -u +%Y-%m-%dT%H:%M:%SZ) — git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "python: $PY"
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$SUMMARY"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi 2>&1 | tee -a "$SUMMARY"
else
    say "nvidia-smi: not found"
fi
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2 | tee -a "$SUMMARY"

# ---- build: the CUDA extension in place (optional; the package works without it) ----------
BUILD_LOG="$OUT/build.log"
: > "$BUILD_LOG"
if [ "$HAS_GPU" != "1" ] && [ "${GPU_CHECK_BUILD:-0}" != "1" ]; then
    STEPS+=("build: skipped (no GPU; GPU_CHECK_BUILD=1 forces it)")
elif [ -f setup.py ]; then
    # FLEXKERN_BUILD_CUDA=1: a failed build shows as a failed step (the script goes on).
    step "build (setup.py build_ext --inplace)" 150 "$BUILD_LOG" \
        env FLEXKERN_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
else
    STEPS+=("build: skipped (no setup.py)")
fi
step "import and backends" 60 "$BUILD_LOG" "$PY" - <<'PYEOF'
import importlib.util, torch, flexkern
from flexkern.ops import backend
print("flexkern._C built:", importlib.util.find_spec("flexkern._C") is not None)
for op in ("route", "dispatch", "experts_swiglu", "experts_swiglu_backward"):
    print(f"  {op:<24} backends: {backend.available(op)}")
PYEOF

# ---- GPU tests ------------------------------------------------------------------------------
TEST_LOG="$OUT/gpu_tests.log"
: > "$TEST_LOG"
if [ "$HAS_GPU" = "1" ]; then
    # --maxfail rather than -x: one GPU session should show more than the first failure.
    step "GPU tests (pytest -m gpu)" 120 "$TEST_LOG" "$PY" -m pytest -m gpu -q --maxfail=5 -rfE \
        --durations=10 -p no:cacheprovider tests
else
    echo "no GPU: GPU tests skipped" | tee -a "$TEST_LOG"
    STEPS+=("GPU tests: skipped (no GPU)")
fi

# ---- benchmarks -----------------------------------------------------------------------------
BENCH_LOG="$OUT/bench_moe.log"
: > "$BENCH_LOG"
# The benchmark stops starting measurements after BUDGET s, leaving time to finish and write.
BUDGET=$((TOTAL_S - SECONDS - 60))
[ "$BUDGET" -gt "${GPU_CHECK_BENCH_BUDGET_S:-160}" ] && BUDGET="${GPU_CHECK_BENCH_BUDGET_S:-160}"
[ "$BUDGET" -lt 20 ] && BUDGET=20
step "benchmark (layer + routing)" 220 "$BENCH_LOG" "$PY" -m benchmarks.bench_moe --check \
    --budget-s "$BUDGET" \
    --json "$OUT/bench_moe.json" --png "$OUT/bench_moe.png" --routing-json "$OUT/bench_routing.json"

# ---- summary --------------------------------------------------------------------------------
say ""
say "=== summary ($SECONDS s) ==="
for s in "${STEPS[@]}"; do say "  $s"; done
say "  tests: $(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$TEST_LOG" | tail -n 1)"
if [ -f "$OUT/bench_moe.json" ]; then
    "$PY" - "$OUT/bench_moe.json" <<'PYEOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
m = r["meta"]
print(f"  bench: {m.get('gpu') or 'cpu'}, {len(r['layer'])} layer rows, {len(r['routing'])} routing rows,"
      f" partial={r.get('partial', False)}")
bad = [c for c in r.get("check", []) if c["status"] != "ok"]
print(f"  check: {len(r.get('check', [])) - len(bad)} ok, {len(bad)} not ok"
      + "".join(f"\n    {c['shape']} {c['path']}: {c['status']}" for c in bad))
for g in r.get("goals", []):
    verdict = {True: "MET", False: "missed", None: "n/a"}[g["met"]]
    print(f"  [{verdict:>6}] {g['goal']}: {g['value']} (target {g['target']}) {g['detail']}")
PYEOF
else
    say "  bench: no JSON written"
fi
say "  files: $(cd "$OUT" && ls | tr '\n' ' ')"
