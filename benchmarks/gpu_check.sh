#!/usr/bin/env bash
# One command for a lent GPU machine (no network): build flexkern in place, run the GPU tests,
# the layer benchmark (all shapes, --check), the pytest-benchmark suite, the per-kernel breakdown
# with profiler traces, and, with the time left, one launch-config sweep. Installs nothing.
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh [--dry-run]
#
# Files under $OUT (8 at most, as a lent machine returns): summary.txt, gpu_check.log (every
# step's output), bench_moe.json, bench_moe.png, bench_suite.json (pytest-benchmark), tune.json
# (per-kernel breakdown), traces.tar (gzipped Chrome traces, one per shape, and
# bench_engines.json: the engines' MoE step with and without flexkern), tune_sweep.json.
# Every step has its own time limit; all of them stop by GPU_CHECK_TOTAL_S (default 470 s, ~8
# minutes). A failed build only means the Triton/reference backends are used. Without a GPU the
# GPU steps are skipped and the benchmarks run their small CPU smoke versions; --dry-run prints
# the plan and runs nothing.
#
# Knobs (environment): GPU_CHECK_TOTAL_S, GPU_CHECK_BENCH_BUDGET_S (layer benchmark, 110),
# GPU_CHECK_SUITE_BUDGET_S (suite, 100), GPU_CHECK_SUITE_ROUNDS (10), GPU_CHECK_BREAKDOWN_SHAPES,
# GPU_CHECK_SWEEP_SHAPES (qwen3; empty: no sweep), GPU_CHECK_ENGINE_SHAPES (olmoe,qwen3),
# GPU_CHECK_BUILD=1 (build without a GPU too),
# GPU_CHECK_TESTS=0 (no pytest -m gpu, for a short second try).
set -uo pipefail
export PYTHONUNBUFFERED=1
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/flexkern_gpu_check}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flexkern_gpu_check.XXXXXX")"   # per-step logs, traces
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the in-place build is importable as is
TOTAL_S="${GPU_CHECK_TOTAL_S:-470}"                   # hard ceiling for all steps together
SUMMARY="$OUT/summary.txt"
LOG="$OUT/gpu_check.log"
: > "$SUMMARY"
[ "$DRY_RUN" = 1 ] || : > "$LOG"

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

# step NAME LIMIT_S CMD...: run CMD under a time limit (capped by what is left of TOTAL_S), output
# to the terminal, to $LOG and to $WORK/<n>.log; record the outcome for the summary. In a dry run
# only the plan is printed.
STEPS=()
STEP_N=0
step() {
    local name="$1" limit="$2"; shift 2
    STEP_N=$((STEP_N + 1))
    STEP_LOG="$WORK/$STEP_N.log"
    : > "$STEP_LOG"
    if [ "$DRY_RUN" = 1 ]; then
        STEPS+=("$name: would run (limit ${limit}s): $*"); return 0
    fi
    local left=$((TOTAL_S - SECONDS))
    if [ "$left" -lt 15 ]; then
        STEPS+=("$name: skipped (time budget spent)"); return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$STEP_LOG"
    rc=$?
    local what="ok"
    [ "$rc" -ne 0 ] && what="FAILED rc=$rc"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && what="TIMED OUT after ${limit}s"
    STEPS+=("$name: $what ($((SECONDS - t0)) s)")
    return 0
}

# budget DEFAULT: seconds a benchmark may spend starting measurements (what is left, less a margin)
budget() {
    local b=$((TOTAL_S - SECONDS - 60))
    [ "$b" -gt "$1" ] && b="$1"
    [ "$b" -lt 20 ] && b=20
    echo "$b"
}

say "flexkern GPU check — $(date -u +%Y-%m-%dT%H:%M:%SZ) — git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$([ "$DRY_RUN" = 1 ] && echo ' — DRY RUN')"
say "python: $PY"
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
HAS_PYTEST_BENCHMARK=$("$PY" -c "import pytest_benchmark; print(1)" 2>/dev/null || echo 0)
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$SUMMARY"
say "GPU: $([ "$HAS_GPU" = 1 ] && echo yes || echo 'none (CPU smoke versions)'); pytest-benchmark: $([ "$HAS_PYTEST_BENCHMARK" = 1 ] && echo yes || echo no)"
if [ "$DRY_RUN" = 0 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 20 nvidia-smi 2>&1 | tee -a "$SUMMARY"
    else
        say "nvidia-smi: not found"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2 | tee -a "$SUMMARY"
fi

# ---- build: the CUDA extension in place (optional; the package works without it) ----------
if [ "$HAS_GPU" != "1" ] && [ "${GPU_CHECK_BUILD:-0}" != "1" ]; then
    STEPS+=("build: skipped (no GPU; GPU_CHECK_BUILD=1 forces it)")
elif [ -f setup.py ]; then
    # FLEXKERN_BUILD_CUDA=1: a failed build shows as a failed step (the script goes on).
    step "build (setup.py build_ext --inplace)" 150 env FLEXKERN_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
else
    STEPS+=("build: skipped (no setup.py)")
fi
step "import and backends" 60 "$PY" -c '
import importlib.util, flexkern
from flexkern.ops import backend
print("flexkern._C built:", importlib.util.find_spec("flexkern._C") is not None)
for op in ("route", "dispatch", "experts_swiglu", "experts_swiglu_backward"):
    print(f"  {op:<24} backends: {backend.available(op)}")
'

# ---- GPU tests ------------------------------------------------------------------------------
TEST_LOG=""
if [ "${GPU_CHECK_TESTS:-1}" = "0" ]; then
    STEPS+=("GPU tests: skipped (GPU_CHECK_TESTS=0)")
elif [ "$HAS_GPU" = "1" ]; then
    # --maxfail rather than -x: one GPU session should show more than the first failure.
    step "GPU tests (pytest -m gpu)" 130 "$PY" -m pytest -m gpu -q --maxfail=5 -rfE \
        --durations=10 -p no:cacheprovider tests
    TEST_LOG="$STEP_LOG"
else
    STEPS+=("GPU tests: skipped (no GPU)")
fi

# ---- the layer benchmark: every shape (the new skewed and Qwen3-like ones too), --check -----
step "layer benchmark (bench_moe --check, layer + routing)" 170 "$PY" -m benchmarks.bench_moe --check \
    --budget-s "$(budget "${GPU_CHECK_BENCH_BUDGET_S:-110}")" \
    --json "$OUT/bench_moe.json" --png "$OUT/bench_moe.png"

# ---- the training engines' MoE step with and without flexkern (OLMo-core, torchtitan) -------
# Its JSON travels inside traces.tar (a lent machine returns 8 files); the table is in the log.
mkdir -p "$WORK/traces"
ENGINE_SHAPES=()
[ "$HAS_GPU" = 1 ] && ENGINE_SHAPES=(--shapes "${GPU_CHECK_ENGINE_SHAPES:-olmoe,qwen3}")  # CPU: its tiny default
step "engines benchmark (bench_engines: OLMo-core / torchtitan MoE step, own path vs flexkern)" 100 \
    "$PY" -m benchmarks.bench_engines "${ENGINE_SHAPES[@]}" --json "$WORK/traces/bench_engines.json"

# ---- the pytest-benchmark suite (the regression record between commits) ---------------------
if [ "$HAS_PYTEST_BENCHMARK" = 1 ]; then
    ROUNDS="${GPU_CHECK_SUITE_ROUNDS:-10}"
    [ "$HAS_GPU" = 1 ] || ROUNDS=2
    step "pytest-benchmark suite (pytest benchmarks)" 150 "$PY" -m pytest benchmarks -q -p no:cacheprovider \
        --bench-rounds "$ROUNDS" --bench-budget-s "$(budget "${GPU_CHECK_SUITE_BUDGET_S:-100}")" \
        --benchmark-json="$OUT/bench_suite.json" --benchmark-columns=min,median,max,rounds \
        --benchmark-sort=fullname
else
    STEPS+=("pytest-benchmark suite: skipped (pytest-benchmark not installed)")
fi

# ---- per-kernel breakdown and profiler traces, then one launch-config sweep ------------------
step "per-kernel breakdown + traces (tune_experts --breakdown-only)" 90 "$PY" -m benchmarks.tune_experts \
    --breakdown-only --shapes "${GPU_CHECK_BREAKDOWN_SHAPES:-olmoe,mixtral,flexolmo-7x7b,qwen3,mixtral-skew50,olmoe-drop50}" \
    --json "$OUT/tune.json" --trace-dir "$WORK/traces"
if [ "$DRY_RUN" = 0 ] && [ -n "$(ls "$WORK/traces" 2>/dev/null)" ]; then
    tar -cf "$OUT/traces.tar" -C "$WORK" traces
fi
SWEEP_SHAPES="${GPU_CHECK_SWEEP_SHAPES-qwen3}"
SWEEP_S=$((TOTAL_S - SECONDS - 20))   # the time that is left; the JSON grows after each role
[ "$DRY_RUN" = 1 ] && SWEEP_S=120
if [ -z "$SWEEP_SHAPES" ]; then
    STEPS+=("launch-config sweep: skipped (GPU_CHECK_SWEEP_SHAPES empty)")
elif [ "$SWEEP_S" -lt 30 ]; then
    STEPS+=("launch-config sweep: skipped (time budget spent)")
else
    step "launch-config sweep (tune_experts --shapes $SWEEP_SHAPES)" "$SWEEP_S" \
        "$PY" -m benchmarks.tune_experts --shapes "$SWEEP_SHAPES" --json "$OUT/tune_sweep.json"
fi

# ---- summary --------------------------------------------------------------------------------
say ""
say "=== summary ($SECONDS s) ==="
for s in "${STEPS[@]}"; do say "  $s"; done
[ "$DRY_RUN" = 1 ] && exit 0
[ -n "$TEST_LOG" ] && say "  tests: $(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$TEST_LOG" | tail -n 1)"
"$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$SUMMARY"
import json, os, sys
out = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        print(f"  {name}: not written ({type(exc).__name__})")
        return None


r = load("bench_moe.json")
if r:
    m = r["meta"]
    print(f"  bench: {m.get('gpu') or 'cpu'}, {len(r['layer'])} layer rows, {len(r['routing'])} routing rows,"
          f" partial={r.get('partial', False)}")
    bad = [c for c in r.get("check", []) if c["status"] != "ok"]
    print(f"  check: {len(r.get('check', [])) - len(bad)} ok, {len(bad)} not ok"
          + "".join(f"\n    {c['shape']} {c['path']}: {c['status']}" for c in bad))
    for g in r.get("goals", []):
        verdict = {True: "MET", False: "missed", None: "n/a"}[g["met"]]
        print(f"  [{verdict:>6}] {g['goal']}: {g['value']} (target {g['target']}) {g['detail']}")
s = load("bench_suite.json")
if s:
    b = s["benchmarks"]
    print(f"  suite: {s['machine_info'].get('gpu')}, {len(b)} cases; flexkern vs torch_gmm, share of dense:")
    for x in (c["extra_info"] for c in b):
        if x.get("path", "").startswith("flexkern:") and "median_ms" in x:
            vs = f"{x['speedup_vs_torch_gmm']:.2f}x torch_gmm" if "speedup_vs_torch_gmm" in x else "-"
            dense = f"{100 * x['dense_share']:.0f}% dense" if "dense_share" in x else ""
            print(f"    {x['shape']['name']:<18} {x['mode']:<8} {x['path']:<18} {x['median_ms']:9.3f} ms "
                  f"{x['tflops']:7.1f} TFLOP/s  {vs}  {dense}")
t = load("tune.json")
if t:
    for res in t.get("results", []):
        if res.get("launches"):  # per role, in launch order (fwd: gate_up, down, combine; then bwd)
            top = ", ".join(f"{r['role']} {r['ms']:.2f}" for r in res["launches"] if r["ms"] >= 0.01)
        else:
            top = ", ".join(f"{name[:40]} {ms:.2f}" for name, ms in res.get("breakdown_ms", [])[:3])
        print(f"  kernels ms {res['shape']['name']}: {top}")
PYEOF
say "  files: $(cd "$OUT" && ls | tr '\n' ' ')"
