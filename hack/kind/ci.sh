#!/usr/bin/env bash
# The kind end-to-end run as CI runs it: hack/kind/e2e.py from whatever is cached (a
# bare machine builds everything: Docker from Debian, the images, the node image), the
# cluster deleted at the end. The result goes to $EDGEAI_E2E_OUT (default: a temporary
# file), not to docs/results/, so a CI run changes no committed file. Exit status: e2e.py's
# (1 when any step failed). Needs root.
#
#   hack/kind/ci.sh            # prints each step's outcome and the total time last
#   hack/kind/ci.sh --skip training   # arguments go to e2e.py
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
out=${EDGEAI_E2E_OUT:-$(mktemp -d)/e2e-kind.json}
started=$(date +%s)
rc=0
"$python" "$here/e2e.py" --out "$out" --conditions "CI (hack/kind/ci.sh)" "$@" || rc=$?
"$python" - "$out" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for name, step in report["steps"].items():
    print(f"[kind-ci] {name:12} {'ok    ' if step['ok'] else 'FAILED'} {step['seconds']:7.1f}s")
PY
echo "[kind-ci] rc=$rc total $(( $(date +%s) - started ))s; result: $out"
exit "$rc"
