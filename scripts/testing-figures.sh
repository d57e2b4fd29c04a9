#!/usr/bin/env bash
# Prints the figures block of TESTING.md from the log of one test run: the
# "figures: TEST: ..." summary lines the long tests print themselves
# (testutil.Figure) and TestCrash's "crash simulation: ..." line, under the
# run's own header line ("# run: COMMAND, DATE, COMMIT", written by the
# Makefile). With --update FILE it replaces the block between the
# "<!-- figures:begin -->" and "<!-- figures:end -->" lines of FILE.
#
#   scripts/testing-figures.sh [LOG] [--update TESTING.md]
#
# LOG defaults to /tmp/sparsedisk-test.log (`make test`); `make crashtest`
# writes /tmp/sparsedisk-crashtest.log.
set -euo pipefail
log=/tmp/sparsedisk-test.log
update=
while [ $# -gt 0 ]; do
	case $1 in
	--update) update=$2; shift 2 ;;
	*) log=$1; shift ;;
	esac
done
[ -r "$log" ] || { echo "testing-figures: cannot read $log" >&2; exit 1; }

block() {
	local run
	run=$(grep -m1 '^# run: ' "$log" | sed 's/^# run: //') || true
	[ -n "$run" ] || run="(log without a run header)"
	echo "Figures printed by the run \`$run\` (log \`$(basename "$log")\`), collected by \`scripts/testing-figures.sh\`:"
	echo
	local n=0
	while IFS= read -r line; do
		case $line in
		"figures: "*)
			line=${line#figures: }
			echo "- \`${line%%: *}\`: ${line#*: }"
			n=$((n + 1))
			;;
		"crash simulation: "*)
			echo "- \`TestCrash\`: ${line#crash simulation: }"
			n=$((n + 1))
			;;
		esac
	done <"$log"
	if [ $n -eq 0 ]; then
		echo "testing-figures: no figure lines in $log" >&2
		return 1
	fi
}

if [ -z "$update" ]; then
	block
	exit
fi
out=$(block)
tmp=$(mktemp)
awk -v blk="$out" '
	/^<!-- figures:begin -->$/ { print; print blk; skip = 1; found = 1; next }
	/^<!-- figures:end -->$/ { skip = 0 }
	!skip { print }
	END { if (!found) exit 3 }
' "$update" >"$tmp" || { rm -f "$tmp"; echo "testing-figures: no figures block in $update" >&2; exit 1; }
mv "$tmp" "$update"
