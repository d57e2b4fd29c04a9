#!/usr/bin/env bash
# Runs every fuzz target of the module for FUZZTIME (default 10s) each.
# The targets are found by name, so a new Fuzz* function is picked up
# without editing this script. Exits non-zero on the first failure; the
# failing input is then in the package's testdata/fuzz/ folder.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${FUZZTIME:-10s}
n=0
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		echo "fuzz: $pkg $f for $t"
		go test -run '^$' -fuzz "^$f\$" -fuzztime "$t" "$pkg" 2>&1 | tail -n 3
		n=$((n + 1))
	done
done
echo "fuzz: $n targets ran for $t each, no failure"
