"""Redis throughput, bare against sandboxed (port_remap + net_allow_hosts + Landlock), in the same run.

Two redis-servers run side by side for the whole benchmark: a bare one, and one inside a Sandbox with
``port_remap`` (it binds virtual port 6379, the host reaches it through ``Sandbox.ports()``),
``net_allow_hosts=["localhost"]`` (connect/sendto/sendmsg/sendmmsg and /etc/hosts are supervised), Landlock
read-only /usr /lib /etc and ``net_bind=[6379]``. ``redis-benchmark -t set,get -n N`` is run against each,
alternating bare/sandboxed for R rounds; the medians of requests per second and their ratio are reported.
On a machine with two or more CPUs both servers are pinned to CPU 0 (``taskset`` / ``cpu_cores``) and the client
to CPU 1, so the scheduler's placement, the largest source of run-to-run spread on a small machine, is the
same for both.
Target: sandboxed >= 97% of bare for both SET and GET.

Usage: .venv/bin/python benchmarks/redis.py [N=100000] [ROUNDS=5]
"""
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

from sandlock_core import Policy, Sandbox

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
SERVER_ARGS = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_up(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis on port {port} did not come up")


def shutdown(port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"SHUTDOWN NOSAVE\r\n")
            s.recv(100)
    except OSError:
        pass


PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
SERVER_PIN = ["taskset", "-c", "0"] if PIN else []
CLIENT_PIN = ["taskset", "-c", "1"] if PIN else []


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (the kernel's accounting: steal and scheduling noise do not enter it)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(port: int) -> dict[str, float]:
    out = subprocess.run([*CLIENT_PIN, "redis-benchmark", "-p", str(port), "-t", "set,get", "-n", str(N), "-q"],
                         capture_output=True, text=True, check=True).stdout
    return {t: float(re.findall(rf"{t}: ([\d.]+) requests per second", out)[-1]) for t in ("SET", "GET")}


def main():
    if not shutil.which("redis-server") or not shutil.which("redis-benchmark"):
        sys.exit("redis-server and redis-benchmark are needed (apt-get install redis-server)")
    bare_port = free_port()
    bare = subprocess.Popen([*SERVER_PIN, "redis-server", "--port", str(bare_port), *SERVER_ARGS], stdout=subprocess.DEVNULL)
    policy = Policy(port_remap=True, net_allow_hosts=["localhost"], net_bind=[6379],
                    fs_readable=["/usr", "/lib", "/etc"], cwd="/tmp",
                    **({"cpu_cores": [0]} if PIN else {}))
    sb = Sandbox(policy)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("res", sb.run(
        ["redis-server", "--port", "6379", *SERVER_ARGS])))
    t.start()
    while 6379 not in sb.ports():
        if not t.is_alive():
            sys.exit(f"sandboxed redis-server failed: {box.get('res')}")
        time.sleep(0.02)
    sand_port = sb.ports()[6379]
    try:
        wait_up(bare_port)
        wait_up(sand_port)
        results = {"bare": [], "sandlock": []}
        pids = {"bare": bare.pid, "sandlock": sb.pid}  # taskset execs redis-server
        cpu = {"bare": 0.0, "sandlock": 0.0}
        for r in range(ROUNDS):
            order = [("bare", bare_port), ("sandlock", sand_port)]
            if r % 2:
                order.reverse()
            for name, port in order:
                before = cpu_seconds(pids[name]) if pids[name] else 0.0
                results[name].append(bench(port))
                cpu[name] += (cpu_seconds(pids[name]) if pids[name] else 0.0) - before
        print(f"redis-benchmark -t set,get -n {N}, {ROUNDS} alternating rounds{', servers on CPU 0, client on CPU 1' if PIN else ''} "
              f"(sandboxed: port 6379 -> {sand_port})")
        for test in ("SET", "GET"):
            b = statistics.median(x[test] for x in results["bare"])
            s = statistics.median(x[test] for x in results["sandlock"])
            runs = " ".join(f"{x[test]:.0f}/{y[test]:.0f}" for x, y in zip(results["bare"], results["sandlock"]))
            paired = statistics.median(y[test] / x[test] for x, y in zip(results["bare"], results["sandlock"]))
            print(f"{test}: bare {b:.0f} rps, sandlock {s:.0f} rps, ratio of medians {s / b:.3f}, "
                  f"median of paired ratios {paired:.3f}   (bare/sandlock: {runs})")
        if all(pids.values()):
            per = {k: cpu[k] / (ROUNDS * 2 * N) * 1e6 for k in cpu}
            print(f"server CPU time per request (utime+stime): bare {per['bare']:.2f} us, sandlock "
                  f"{per['sandlock']:.2f} us, ratio {per['bare'] / per['sandlock']:.3f} (bare/sandlock)")
    finally:
        shutdown(sand_port)
        shutdown(bare_port)
        t.join(10)
        bare.wait(10)
        sb.close()
    if "res" in box:
        print(f"notifications answered by the supervisor for the sandboxed server: {box['res'].notifications} "
              f"(for {ROUNDS * 2 * N} requests: the hot path is not supervised)")


if __name__ == "__main__":
    main()
