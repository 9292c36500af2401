#!/usr/bin/env bash
# `make lock`: refresh requirements/*.txt to the newest releases within setup.py's ranges (requirements/pins.in
# holds the deliberate pins), then build a fresh venv from the new lock and run the fast tests in it. Says what
# changed and, if the tests fail, what broke; the old lock comes back with `git checkout requirements/`.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${LOCK_TOOLS:-.venv-locktools}   # pip-tools lives apart from the project's venvs
CHECK=${LOCK_VENV:-.venv-lock}         # the fresh venv the new lock is tested in
[ -x "$TOOLS/bin/pip-compile" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q pip-tools; }
export CUSTOM_COMPILE_COMMAND="make lock"
compile() {  # compile OUT [pip-compile flags]: exact versions, no index or wheel-cache lines, pip/setuptools kept
    local out=$1; shift
    "$TOOLS/bin/pip-compile" -q --upgrade --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url \
        -o "$out" "$@" setup.py requirements/pins.in
}
pins() { grep -E '^[A-Za-z0-9_.-]+==' "$1" | sed 's/==/ /' | sort -k1,1; }
old=$(mktemp); pins requirements/test.txt > "$old" || true
compile requirements/train.txt
# test.txt is train.txt plus the test extra, at the same versions: moving from one venv to the other only adds.
compile requirements/test.txt --extra test -c requirements/train.txt
echo "lock: changed pins (old -> new):"
join -a1 -a2 -e '(none)' -o 0,1.2,2.2 "$old" <(pins requirements/test.txt) | awk '$2 != $3 {print "  " $1 ": " $2 " -> " $3}'
rm -f "$old"
rm -rf "$CHECK"
echo "lock: a fresh $CHECK from the new lock, then make test-fast in it"
if make --no-print-directory test-fast VENV="$CHECK"; then
    echo "lock: the fast tests pass on the new lock. Run make test before committing requirements/."
else
    echo "lock: the newest versions broke the fast tests above (the FAILED lines name them)." >&2
    echo "lock: keep the old lock with git checkout requirements/, or fix megapix and pin what must stay in" \
         "requirements/pins.in." >&2
    exit 1
fi
