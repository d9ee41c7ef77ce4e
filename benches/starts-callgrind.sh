#!/usr/bin/env bash
# User-space instructions per start, which do not drift with the machine (BENCHMARKS.md, "What a
# start costs"): the build's server under callgrind serves N sequential starts (curl), and the
# same with none; the difference over N is one start's cost. Needs valgrind.
#
#   benches/starts-callgrind.sh BUILD_DIR [N]      (BUILD_DIR holds vm-workflow; N default 200)
set -euo pipefail
bin=$1/vm-workflow
n=${2:-200}
addr=127.0.0.1:18780
gql=http://$addr/graphql
. "$(dirname "$0")/start-request.sh"

# Total instructions of a server that served $1 starts.
serve_starts() {
  local data out pid thread body
  data=$(mktemp -d)
  out=$data.callgrind
  VM_WORKERS=0 valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" --data-dir "$data" --bind "$addr" serve >"$data.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do curl -sf -o /dev/null "http://$addr/healthz" && break; sleep 0.2; done
  thread=$(make_thread "$gql")
  body=$(start_body "$thread")
  for _ in $(seq "$1"); do
    curl -sf "$gql" -H 'content-type: application/json' -d "$body" >/dev/null
  done
  kill -INT "$pid"
  wait "$pid" || true
  awk '/^summary:/ {print $2}' "$out"
}

none=$(serve_starts 0)
some=$(serve_starts "$n")
echo "instructions: $none with no start, $some with $n; per start: $(( (some - none) / n ))"
