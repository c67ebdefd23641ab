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
script="echo hello from the sandbox > $work/ok; cat $work/ok; ls /root; touch /var/tmp/sandlock-demo"
echo "$ sandlock run ${ro[*]} -w $work -- sh -c '$script'"
echo "  (writing under $work is allowed; listing /root and writing /var/tmp are refused by Landlock)"
set +e
$SL run "${ro[@]}" -w "$work" -- sh -c "$script"
echo "exit code: $?"
rm -rf "$work"
