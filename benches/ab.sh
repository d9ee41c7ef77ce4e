#!/usr/bin/env bash
# Alternating pairs of two builds under the load generator (BENCHMARKS.md, "Commands").
#
#   benches/ab.sh [-p PAIRS] [-o OUT] DIR_A DIR_B [loadgen flags...]
#
# DIR_A and DIR_B each hold a `vm-workflow` and a `loadgen` binary (copy them out of
# target/release and target/release/examples after building each commit). Each run starts the
# build's server on a new data directory (127.0.0.1:18766), runs the load generator, stops the
# server with SIGINT and prints one line: runs/s, latencies (ms), server CPU and peak RSS from
# the load generator, and per run the write lock's time, its sends' time, the statements and sends sent and the commits
# (from the server's `write turns since start` line). A before B in odd pairs, B before A in even
# ones. Data directories are kept under OUT (default /tmp/vm-ab): deleting them while measuring
# slows the next runs on file systems mounted with `discard`. With DATABASE_URL set to a
# Postgres server, each run gets a database of its own there instead (created and dropped), and
# the line adds the CPU time per run of the server's writer backend (the Postgres process
# behind its `vm-workflow writer` connection, which executes every write under the lock), when
# that Postgres runs on this machine and the connection lasted the whole run.
set -euo pipefail

pairs=3
out=/tmp/vm-ab
while getopts "p:o:" opt; do
  case $opt in
    p) pairs=$OPTARG ;;
    o) out=$OPTARG ;;
    *) sed -n 2,14p "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] || { sed -n 2,14p "$0"; exit 2; }
dir_a=$1 dir_b=$2
shift 2
for d in "$dir_a" "$dir_b"; do
  [ -x "$d/vm-workflow" ] && [ -x "$d/loadgen" ] || { echo "$d: no vm-workflow or loadgen" >&2; exit 2; }
done
mkdir -p "$out"
ulimit -n 20000 2>/dev/null || true
addr=127.0.0.1:18766
pg_base=${DATABASE_URL:-}
# Its parameters (`?sslmode=…`) go with every run's database too.
pg_path=${pg_base%%\?*}
pg_query=${pg_base#"$pg_path"}
unset DATABASE_URL
# The server of the run in progress: stopped too when this script is interrupted, so that the
# next invocation finds the port free.
server=""
trap '[ -z "$server" ] || kill -INT "$server" 2>/dev/null' EXIT

# User and system CPU time of process $1 so far, in clock ticks (0 when it is gone).
cpu_ticks() {
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

one() { # one BUILD_DIR LABEL loadgen-flags...
  local bin=$1 label=$2 data db="" pid json turns wpid="" ticks0=0 ticks1=0
  shift 2
  data=$(mktemp -d "$out/$label-XXXXXX")
  if [ -n "$pg_base" ]; then
    db=vm_ab_$(basename "$data" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' _)
    psql -q "$pg_base" -c "CREATE DATABASE $db"
  fi
  env ${db:+DATABASE_URL=${pg_path%/*}/$db$pg_query} "$bin/vm-workflow" --data-dir "$data" --bind "$addr" serve \
    >"$data.log" 2>&1 &
  pid=$!
  server=$pid
  for _ in $(seq 100); do curl -sf -o /dev/null "http://$addr/healthz" && break; sleep 0.1; done
  if [ -n "$db" ]; then
    # The backend's process on this machine (a Postgres elsewhere has its pids elsewhere).
    wpid=$(psql -Atq "$pg_base" -c "SELECT pid FROM pg_stat_activity WHERE datname = '$db' \
      AND application_name = 'vm-workflow writer'" | head -n 1) || wpid=""
    [ -n "$wpid" ] && [ -r "/proc/$wpid/stat" ] || wpid=""
    [ -z "$wpid" ] || ticks0=$(cpu_ticks "$wpid")
  fi
  json=$("$bin/loadgen" --url "http://$addr" --label "$label" "$@" | tail -n 1) || true
  [ -z "$wpid" ] || ticks1=$(cpu_ticks "$wpid")
  kill -INT "$pid" 2>/dev/null || echo "$label: the server had stopped; see $data.log" >&2
  wait "$pid" || true
  server=""
  [ -n "$db" ] && psql -q "$pg_base" -c "DROP DATABASE $db"
  case $json in
    "{"*) ;;
    *) echo "$label: the load generator failed (server log: $data.log)"; return ;;
  esac
  turns=$(sed 's/\x1b\[[0-9;]*m//g' "$data.log" | grep -o 'held_ms=[0-9]* sends_ms=[0-9]*.*statements=[0-9]*' || true)
  JSON=$json TURNS=$turns PG_WRITER_TICKS=$((ticks1 - ticks0)) HZ=$(getconf CLK_TCK) python3 - <<'EOF'
import json, os
j = json.loads(os.environ["JSON"])
pg_writer = int(os.environ["PG_WRITER_TICKS"]) * 1000 / int(os.environ["HZ"])
t = dict(kv.split("=") for kv in os.environ["TURNS"].split())
runs = j["completed"] + 1  # and the warm-up run
f = lambda k: j[k]["p99_ms"]
lock = lambda k: float(t.get(k, "nan")) / runs
print(f'{j["label"]:<8} runs/s {j["runs_per_s"]:7.1f}  start p50 {j["start_ms"]["p50_ms"]:5.1f} '
      f'p99 {f("start_ms"):6.1f} (after first {f("start_after_first_ms"):5.1f})  '
      f'approve p99 {f("approve_ms"):5.1f}  delivery p99 {f("delivery_ms"):5.1f} '
      f'fan-out p99 {(j.get("fanout_delivery_ms") or {}).get("p99_ms", 0):5.1f}  '
      f'cpu/run {1000 * (j["server_cpu_s"] or 0) / j["runs"]:5.2f} ms  '
      f'rss {(j["server_vmhwm_kib"] or 0) / 1024:4.0f} MiB  errors {j["errors"]}  '
      f'| per run: lock {lock("held_ms"):5.2f} ms, sends {lock("sends_ms"):5.2f} ms, '
      f'statements {lock("statements"):5.1f}, sends {lock("sends"):4.1f}, commits {lock("commits"):4.2f}'
      + (f', Postgres writer CPU {pg_writer / runs:4.2f} ms' if pg_writer > 0 else ''))
EOF
}

for i in $(seq "$pairs"); do
  if [ $((i % 2)) -eq 1 ]; then
    one "$dir_a" A "$@"; one "$dir_b" B "$@"
  else
    one "$dir_b" B "$@"; one "$dir_a" A "$@"
  fi
done
