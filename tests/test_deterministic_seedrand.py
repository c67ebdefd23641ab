"""The preloaded seeded getrandom (sandlock_core/csrc/seedrand.c): real processes, the documented stream."""
from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import textwrap

import pytest

from sandlock_core import Policy, Sandbox, seedrand, syscalls
from sandlock_core.plan import Plan
from support import run_as_nobody
from test_deterministic import documented_stream

PY = "/usr/bin/python3"
RO = ["/usr", "/lib", "/lib64", "/etc"]
pytestmark = [
    pytest.mark.skipif(not os.path.exists(seedrand.LIBRARY), reason="_seedrand.so is not built"),
    pytest.mark.skipif(not os.path.exists(PY), reason="needs /usr/bin/python3"),
]


# ---- an independent ChaCha20 (RFC 8439 section 2.3) and the documented per-thread stream ----------------------
M32 = 0xFFFFFFFF


def _rotl(v: int, n: int) -> int:
    return ((v << n) | (v >> (32 - n))) & M32


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key), counter,
             *struct.unpack("<3I", nonce)]
    x = list(state)

    def quarter(a, b, c, d):
        x[a] = (x[a] + x[b]) & M32; x[d] = _rotl(x[d] ^ x[a], 16)  # noqa: E702
        x[c] = (x[c] + x[d]) & M32; x[b] = _rotl(x[b] ^ x[c], 12)  # noqa: E702
        x[a] = (x[a] + x[b]) & M32; x[d] = _rotl(x[d] ^ x[a], 8)  # noqa: E702
        x[c] = (x[c] + x[d]) & M32; x[b] = _rotl(x[b] ^ x[c], 7)  # noqa: E702

    for _ in range(10):
        for q in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                  (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(*q)
    return struct.pack("<16I", *((a + b) & M32 for a, b in zip(x, state)))


def thread_stream(key: bytes, n: int) -> bytes:
    """A thread's libc getrandom bytes as deterministic.py documents them: block i of ChaCha20 under the key,
    counter = i mod 2**32, nonce = (i >> 32, 0, 0) as little-endian words."""
    out, i = b"", 0
    while len(out) < n:
        out += chacha20_block(key, i & M32, struct.pack("<3I", i >> 32, 0, 0))
        i += 1
    return out[:n]


RFC8439_KEY = bytes(range(32))
RFC8439_NONCE = bytes.fromhex("000000090000004a00000000")
RFC8439_BLOCK = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")


def test_chacha20_matches_the_rfc8439_test_vector():
    """RFC 8439 2.3.2: the library's block function and the test's own reference."""
    lib = ctypes.CDLL(seedrand.LIBRARY)  # RTLD_LOCAL: its getrandom does not replace this process's
    key = (ctypes.c_uint32 * 8)(*struct.unpack("<8I", RFC8439_KEY))
    nonce = (ctypes.c_uint32 * 3)(*struct.unpack("<3I", RFC8439_NONCE))
    out = (ctypes.c_uint8 * 64)()
    lib.sl_seedrand_chacha20_block(key, 1, nonce, out)
    assert bytes(out) == RFC8439_BLOCK
    assert chacha20_block(RFC8439_KEY, 1, RFC8439_NONCE) == RFC8439_BLOCK


# ---- real processes ----------------------------------------------------------------------------------------
def run_py(policy: Policy, code: str) -> str:
    r = Sandbox(policy).run([PY, "-I", "-S", "-c", textwrap.dedent(code)], timeout=60)
    assert r.exit_code == 0, r
    assert r.stderr == b"", r.stderr  # ld.so never complains about the preload
    return r.stdout.decode()


# Python's libc getrandom calls: 24 bytes of hash secret at start-up, then the test's draws. glibc's malloc
# takes 8 bytes for its tcache key first, with the raw syscall (its internal getrandom is not interposed).
URANDOM = "import os; print(os.environ.get('LD_PRELOAD', ''), os.urandom(32).hex())"


def test_same_seed_same_bytes_other_seed_other_bytes_and_the_documented_stream():
    one = run_py(Policy(fs_readable=RO, random_seed=7), URANDOM).split()
    two = run_py(Policy(fs_readable=RO, random_seed=7), URANDOM).split()
    other = run_py(Policy(fs_readable=RO, random_seed=8), URANDOM).split()
    assert one == two and one[1] != other[1]
    assert one[0].split(":")[-1] == seedrand.LIBRARY
    key = documented_stream(7, "r", "getrandom", 40)[8:]  # after malloc's 8 bytes
    assert bytes.fromhex(one[1]) == thread_stream(key, 24 + 32)[24:]  # after the hash secret


def test_fork_parent_and_child_draw_different_bytes_the_same_in_every_run():
    code = """
        import os
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, os.urandom(16).hex().encode()); os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 100).decode(), os.urandom(16).hex(), os.urandom(8).hex())
    """
    runs = [run_py(Policy(fs_readable=RO, random_seed=3), code).split() for _ in range(2)]
    assert runs[0] == runs[1]
    child, parent, again = (bytes.fromhex(x) for x in runs[0])
    assert child != parent
    # the child keys from its own stream (r.0, nothing drawn yet); the parent goes on with its own
    assert child == thread_stream(documented_stream(3, "r.0", "getrandom", 32), 16)
    pkey = documented_stream(3, "r", "getrandom", 40)[8:]
    assert parent + again == thread_stream(pkey, 24 + 24)[24:]


def test_threads_key_from_the_process_stream_in_call_order():
    code = """
        import os, threading
        out = []
        for _ in range(2):  # one after the other: threads racing for their keys would race for the bytes
            t = threading.Thread(target=lambda: out.append(os.urandom(16).hex()))
            t.start(); t.join()
        print(os.urandom(16).hex(), *out)
    """
    runs = [run_py(Policy(fs_readable=RO, random_seed=4), code).split() for _ in range(2)]
    assert runs[0] == runs[1]
    main, t1, t2 = (bytes.fromhex(x) for x in runs[0])
    s = documented_stream(4, "r", "getrandom", 8 + 3 * 32)
    assert t1 == thread_stream(s[40:72], 16) and t2 == thread_stream(s[72:104], 16)
    assert main == thread_stream(s[8:40], 40)[24:]


def test_raw_syscall_keeps_the_supervisor_stream_and_libc_errors_match_the_kernel():
    nr = syscalls.number("getrandom")
    code = f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(16)
        print(libc.syscall({nr}, buf, 16, 0), buf.raw.hex())
        out = []
        for flags in (8, 6):  # an unknown flag, GRND_RANDOM|GRND_INSECURE
            out.append((libc.getrandom(buf, 16, flags), ctypes.get_errno()))
        ent = ctypes.create_string_buffer(256)
        out.append((libc.getentropy(ent, 257), ctypes.get_errno()))
        out.append((libc.getentropy(ent, 256), 0))
        out.append((libc.getrandom(None, 16, 0), ctypes.get_errno()))
        flagged = []
        for flags in (2, 1, 4):  # GRND_RANDOM, GRND_NONBLOCK, GRND_INSECURE: the same stream
            libc.getrandom(buf, 8, flags)
            flagged.append(buf.raw[:8].hex())
        print(out, "".join(flagged), os.getrandom(8, os.GRND_RANDOM).hex())  # os.getrandom: the raw syscall
    """
    a = run_py(Policy(fs_readable=RO, random_seed=9), code)
    assert a == run_py(Policy(fs_readable=RO, random_seed=9), code)
    first, second = a.splitlines()
    count, raw = first.split()
    s = documented_stream(9, "r", "getrandom", 56)
    assert count == "16" and bytes.fromhex(raw) == s[40:56]  # malloc 8, the main thread's key 32, then these
    assert second.startswith("[(-1, 22), (-1, 22), (-1, 5), (0, 0), (-1, 14)] ")  # EINVAL, EIO, EFAULT
    flagged, raw2 = (bytes.fromhex(x) for x in second.split("] ")[1].split())
    assert flagged == thread_stream(s[8:40], 24 + 256 + 24)[24 + 256:]  # flags change nothing
    assert raw2 == documented_stream(9, "r", "getrandom", 80)[72:]  # the EFAULT call used up 16 bytes


def test_clean_env_and_a_user_preload_keep_the_library():
    libm = "/lib/x86_64-linux-gnu/libm.so.6" if os.path.exists("/lib/x86_64-linux-gnu/libm.so.6") else None
    env = {"LD_PRELOAD": libm} if libm else {}
    got = run_py(Policy(fs_readable=RO, random_seed=1, clean_env=True, env=env), URANDOM).split()
    assert got[0] == (f"{libm}:{seedrand.LIBRARY}" if libm else seedrand.LIBRARY)
    plain = run_py(Policy(fs_readable=RO, random_seed=1), URANDOM).split()
    assert got[1] == plain[1]


def test_no_ld_so_noise_under_a_confined_filesystem_shell_and_children():
    policy = Policy(fs_readable=RO + ["/bin"], random_seed=2)
    r = Sandbox(policy, record_denials=True).run(["sh", "-c", f"ls /usr | wc -l; {PY} -I -S -c 'import os; os.urandom(4)'; "
                                         f"env -i {PY} -I -S -c 'import os; print(os.urandom(4).hex())'"],
                            timeout=60)
    assert r.exit_code == 0 and r.stderr == b"", r
    assert not [d for d in r.denials if "_seedrand" in str(d)], r.denials  # the denial mirror knows the rule
    assert len(r.stdout.split()) == 2  # env -i: no preload, the supervisor path serves it
    # the control: without the rule sandlock adds, ld.so could not read the library and would say so
    bare = Sandbox(Policy(fs_readable=RO, env={"LD_PRELOAD": seedrand.LIBRARY})).run([PY, "-I", "-S", "-c", ""])
    assert b"cannot be preloaded" in bare.stderr or seedrand.LIBRARY.startswith(tuple(d + "/" for d in RO))


def test_the_confined_function_passes_the_library_to_its_subprocesses():
    import subprocess
    got = []

    def body():
        out = subprocess.run([PY, "-I", "-S", "-c", URANDOM], capture_output=True, text=True).stdout
        raise SystemExit(0 if out.split()[0].split(":")[-1] == seedrand.LIBRARY else 3)

    r = Sandbox(Policy(fs_readable=RO + ["/tmp", os.path.dirname(os.path.dirname(seedrand.LIBRARY))],
                       random_seed=1)).run_function(body, timeout=60)
    got.append(r.exit_code)
    assert got == [0], r


def test_not_preloaded_where_the_host_path_may_not_exist():
    for kw in (dict(chroot="/"), dict(privileged=True), dict(fs_isolation="overlayfs", workdir="/tmp")):
        assert seedrand.library(Policy(random_seed=1, **kw)) is None, kw
    assert seedrand.library(Policy(random_seed=1, fs_denied=[os.path.dirname(seedrand.LIBRARY)])) is None
    assert seedrand.library(Policy()) is None
    plan = Plan(Policy(random_seed=1, clean_env=True))
    try:
        assert plan.environ()[b"LD_PRELOAD"] == os.fsencode(seedrand.LIBRARY)
    finally:
        plan.close()


def test_unprivileged_supervisor_and_sandbox_get_the_same_bytes():
    code = textwrap.dedent(f"""
        from sandlock_core import Policy, Sandbox
        r = Sandbox(Policy(fs_readable={RO!r}, random_seed=7)).run(
            [{PY!r}, "-I", "-S", "-c", {URANDOM!r}], timeout=60)
        print(r.exit_code, r.stderr == b"", r.stdout.decode().split()[-1])
    """)
    p = run_as_nobody(code)
    assert p.returncode == 0, p.stderr
    code_, quiet, got = p.stdout.split()
    assert code_ == "0" and quiet == "True"
    key = documented_stream(7, "r", "getrandom", 40)[8:]
    assert bytes.fromhex(got) == thread_stream(key, 24 + 32)[24:]


def test_pytest_marker_subprocesses_get_the_library(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        import subprocess
        import pytest

        @pytest.mark.sandbox(fs_readable={RO!r}, random_seed=5)
        def test_body():
            p = subprocess.run([{PY!r}, "-I", "-S", "-c", {URANDOM!r}], capture_output=True, text=True)
            assert p.stderr == "" and p.returncode == 0
            print("PRELOAD", p.stdout.strip())
    """))
    runs = [pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s") for _ in range(2)]
    got = []
    for r in runs:
        r.assert_outcomes(passed=1)
        got.append([line.split("PRELOAD ")[1].split() for line in r.stdout.lines if "PRELOAD " in line])
    assert got[0] == got[1] and len(got[0]) == 1
    assert got[0][0][0].split(":")[-1] == seedrand.LIBRARY


def test_learn_mode_leaves_the_library_out_of_the_profile():
    from sandlock_core import learn as L
    obs = L.Observations()
    obs.reads |= {os.path.realpath(seedrand.LIBRARY), "/usr/lib/os-release"}
    r = L.build_profile(obs, collapse=3, limits=False).fields["fs_readable"]
    assert r == ["/usr"]


STATIC_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
int main(void) {
    void *volatile first = malloc(1); free(first);  /* malloc's 8 bytes of tcache key go first */
    unsigned char b[16];
    if (getrandom(b, 16, 0) != 16) return 2;
    for (int i = 0; i < 16; i++) printf("%02x", b[i]);
    printf("\n");
    return 0;
}
"""


def test_a_static_program_is_served_by_the_supervisor(tmp_path):
    """libc's getrandom linked in statically cannot be preloaded: the raw syscall, the process stream."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing")
    os.chmod(tmp_path, 0o755)
    (tmp_path / "st.c").write_text(STATIC_C)
    exe = tmp_path / "st"
    if subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), str(tmp_path / "st.c")]).returncode:
        pytest.skip("no static libc to link with")
    policy = Policy(fs_readable=RO + [str(tmp_path)], random_seed=6)
    runs = [Sandbox(policy).run([str(exe)], timeout=60) for _ in range(2)]
    assert runs[0].exit_code == 0 and runs[0].stderr == b"", runs[0]
    assert runs[0].stdout == runs[1].stdout
    assert bytes.fromhex(runs[0].stdout.decode()) == documented_stream(6, "r", "getrandom", 24)[8:]


def test_the_landlock_rule_grants_that_one_file_only():
    here = os.path.dirname(seedrand.LIBRARY)
    if any(here == d or here.startswith(d + "/") for d in RO):
        pytest.skip("the package lives under a readable tree anyway")
    code = f"""
        import os
        out = []
        for what, fn in (("lib", lambda: open({seedrand.LIBRARY!r}, "rb").read(4)),
                         ("sibling", lambda: open({os.path.join(here, "seedrand.py")!r}, "rb").read(4)),
                         ("dir", lambda: os.listdir({here!r}))):
            try:
                fn(); out.append(what + ":ok")
            except PermissionError:
                out.append(what + ":EACCES")
        print(*out)
    """
    assert run_py(Policy(fs_readable=RO, random_seed=1), code).split() == ["lib:ok", "sibling:EACCES", "dir:EACCES"]
