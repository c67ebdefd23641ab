"""Cost of one notified syscall answered CONTINUE by our supervisor.

A C child loops N times on getppid() (raw syscall); once with getppid notified (our handler returns
CONTINUE), once unnotified, in the same run. Reports microseconds per call and the difference, which is the
supervisor round trip. The C floor on this machine is about 8 us with SYNC_WAKE_UP (feasibility.md).
Usage: .venv/bin/python benchmarks/notif.py [N]
"""
import os
import subprocess
import sys
import tempfile

from sandlock_core import Policy, Sandbox
from sandlock_core.notif import CONTINUE

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
SRC = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n / 1000.0);
    return 0;
}
"""


def main():
    d = tempfile.mkdtemp()
    src, exe = os.path.join(d, "loop.c"), os.path.join(d, "loop")
    with open(src, "w") as f:
        f.write(SRC)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    plain = Sandbox(Policy())
    notified = Sandbox(Policy(), handlers={"getppid": lambda sup, n: CONTINUE})
    rows = []
    for _ in range(3):
        base = float(plain.run([exe, str(N)]).stdout)
        res = notified.run([exe, str(N)])
        rows.append((base, float(res.stdout)))
    rows.sort(key=lambda r: r[1])
    base, notif = rows[1]
    print(f"getppid unnotified: {base:.3f} us/call")
    print(f"getppid notified (supervisor answers CONTINUE): {notif:.3f} us/call")
    print(f"supervisor round trip: {notif - base:.3f} us ({N} calls, median of 3 runs)")


if __name__ == "__main__":
    main()
