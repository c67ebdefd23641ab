#!/usr/bin/env bash
# Set up, then show a real program running confined: allowed reads work, other reads and writes are refused.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
SL=.venv/bin/sandlock
ro=(-r /usr -r /lib -r /bin -r /etc); [ -d /lib64 ] && ro+=(-r /lib64)
work=$(mktemp -d)
echo "$ sandlock check"; $SL check
echo
echo "$ sandlock run ${ro[*]} -w $work -- sh -c 'echo hi > $work/ok; cat $work/ok; ls /root; touch /var/tmp/nope'"
set +e
$SL run "${ro[@]}" -w "$work" -- sh -c "echo hello from the sandbox > $work/ok; cat $work/ok; ls /root; touch /var/tmp/sandlock-demo"
echo "exit code: $?"
rm -rf "$work"
