#!/usr/bin/env bash
# cli.sh RC REGEX COMMAND...: COMMAND must exit with RC, and its stderr must match REGEX (grep -E);
# when RC is not 0, stderr must be exactly that one line (the "nn-cpp: error: ..." rule).
rc_want="$1" regex="$2"
shift 2
err="$("$@" 2>&1 >/dev/null)"
rc=$?
fail() { printf 'FAIL: %s\n  command: %s\n  exit %s, stderr:\n%s\n' "$1" "$*" "$rc" "$err" >&2; exit 1; }
[ "$rc" = "$rc_want" ] || fail "exit code $rc, expected $rc_want"
grep -Eq -- "$regex" <<<"$err" || fail "stderr does not match: $regex"
if [ "$rc_want" != 0 ] && [ "$(printf '%s\n' "$err" | wc -l)" != 1 ]; then fail "more than one line on stderr"; fi
echo "ok: exit $rc, $err"
