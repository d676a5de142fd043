#!/usr/bin/env bash
# Runs the fast Bazel tests (everything not tagged "slow") with the project's
# venv interpreter, then stops the Bazel server. CI entry point; see DEVELOPERS.md.
#
#   bash scripts/bazel_test.sh [extra `bazel test` arguments...]
#
# Needs: bazel (Debian: apt-get install bazel-bootstrap) and <checkout>/.venv
# (or DINO_KERAS_PYTHON=/abs/path/to/python). Exit code: bazel test's (1 if it
# passed but Bazel left files in the checkout).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
BAZEL="${BAZEL:-bazel}"

if ! command -v "$BAZEL" >/dev/null 2>&1; then
  echo "bazel_test.sh: '$BAZEL' not found; install it with: apt-get install -y bazel-bootstrap" >&2
  exit 127
fi
PYTHON="${DINO_KERAS_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
  echo "bazel_test.sh: no Python interpreter at $PYTHON; create the venv first" \
    "(python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt)" >&2
  exit 2
fi

# Paths in the checkout that look like Bazel output (convenience symlinks,
# output bases) -- there must be none after the run.
bazel_paths() {
  git -C "$ROOT" status --porcelain --ignored 2>/dev/null \
    | sed -E 's/^.. //' | grep -E '(^|/)bazel-[^/]*/?$|(^|/)_bazel_' || true
}
before="$(bazel_paths)"

log="$(mktemp "${TMPDIR:-/tmp}/bazel_test.XXXXXX")"
start=$SECONDS
"$BAZEL" test //... --test_tag_filters=-slow "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
elapsed=$((SECONDS - start))
"$BAZEL" shutdown >/dev/null 2>&1 || echo "bazel_test.sh: warning: bazel shutdown failed" >&2

# One plain closing line counting test targets, e.g. "bazel: 3 passed, 0 failed".
passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?PASSED' "$log")
failed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(FAILED|TIMEOUT|FLAKY|INCOMPLETE|NO STATUS|REMOTE FAILURE|FAILED TO BUILD)' "$log")
rm -f "$log"

after="$(bazel_paths)"
leaked="$(comm -13 <(printf '%s\n' "$before" | sort) <(printf '%s\n' "$after" | sort) | sed '/^$/d')"
if [[ -n "$leaked" ]]; then
  echo "bazel_test.sh: Bazel left output in the checkout:" >&2
  sed 's/^/  /' <<<"$leaked" >&2
  [[ $rc -eq 0 ]] && rc=1
fi

echo "bazel test exited with $rc after ${elapsed}s"
echo "bazel: ${passed} passed, ${failed} failed"
exit "$rc"
