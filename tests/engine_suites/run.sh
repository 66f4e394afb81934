#!/usr/bin/env bash
# An engine's own tests twice: as they are, then with flexkern swapped into every expert module
# they build (flexkern_swap_plugin.py), with per-test counts of flexkern's calls.
#   bash tests/engine_suites/run.sh olmo_core|torchtitan SUITE_DIR TEST_PATH...
# SUITE_DIR is the engine's source checkout (its tests are not in its pip package); the installed
# engine is what runs. Logs and counts go to a new folder under $TMPDIR, printed at the end.
set -u
[ $# -ge 3 ] || { sed -n 2,6p "$0"; exit 2; }
engine=$1 suite=$(cd "$2" && pwd) && shift 2 || exit 2
case $engine in olmo_core|torchtitan) ;; *) echo "engine: olmo_core or torchtitan, not '$engine'" >&2; exit 2;; esac
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/flexkern-engine-suite.XXXXXX")
pyt="python -m pytest -q -p no:cacheprovider -rs --rootdir $suite"

(cd "$suite" && $pyt "$@" > "$out/baseline.log" 2>&1); echo "baseline rc=$?: $(tail -1 "$out/baseline.log")"
(cd "$suite" && PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" FLEXKERN_SWAP_ENGINES=$engine \
   FLEXKERN_SWAP_RESULTS="$out/flexkern.json" $pyt -p flexkern_swap_plugin "$@" > "$out/flexkern.log" 2>&1)
echo "flexkern rc=$?: $(tail -1 "$out/flexkern.log")"
echo "logs, and per-test counts (flexkern.json; the table at the end of flexkern.log): $out"
