#!/usr/bin/env bash
# The start alone (BENCHMARKS.md, "What a start costs"): `startWorkflowRun` posted by wrk with
# C connections for D seconds to a running server, best started with VM_WORKERS=0 so that
# nothing else runs; prints wrk's figures and the server's CPU per start (from /proc).
#
#   benches/starts.sh [URL] [C] [D]      (default http://127.0.0.1:18766 50 5; needs wrk)
set -euo pipefail
url=${1:-http://127.0.0.1:18766}
conns=${2:-50}
secs=${3:-5}
gql=$url/graphql
. "$(dirname "$0")/start-request.sh"
thread=$(make_thread "$gql")
script=$(mktemp --suffix .lua)
trap 'rm -f "$script"' EXIT
cat >"$script" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '$(start_body "$thread")'
LUA
port=${url##*:}
pid=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(ticks)
out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$script" "$gql")
after=$(ticks)
echo "$out"
starts=$(echo "$out" | awk '/requests in/ {print $1}')
echo "server CPU per start: $(echo "($after - $before) * 1000 / $(getconf CLK_TCK) / $starts" | bc -l | cut -c1-5) ms"
