"""The pytest plugin: confined tests through markers, fixtures, options and reports.

Thin on purpose: option parsing, markers, hooks and report formatting. All kernel work goes through
:mod:`sandlock_core` (``Sandbox(policy, record_denials=True).run_function``). Policy resolution and its
precedence are documented in :mod:`pytest_sandlock._policy`; the fork/report protocol in
:mod:`pytest_sandlock._runner`; the denial mirror in :mod:`sandlock_core.denials`.

Two modes. The default, fork mode: setup and teardown run in pytest (fixtures of the pytest process are
visible, session fixtures set up once), and each confined test's call phase runs in a child forked from pytest
(one fork per test: ~8 ms on its own). ``--sandlock-worker`` (ini ``sandlock_worker = true``) adds worker mode:
the tests whose policy is exactly the session's (no marker, or one that changes nothing; no per-test fields
such as ``workdir`` or ``random_seed``) run their whole protocol, fixtures included, in one long-lived confined
worker forked after collection; ``{tmp_path}`` is pytest's basetemp there (writable: the tests of a worker can
write each other's tmp dirs). Every other test falls back to fork mode in the same run. Denials stay per
test (``Sandbox.take_denials()`` once the worker is idle after each test); a crash or timeout fails the
running test with the real cause and the next test gets a new worker. Details: :mod:`pytest_sandlock._worker`.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from . import _policy as P
from . import _report as R
from . import _runner
from . import _worker
from . import _worker_child

PLUGIN_NAME = "sandlock"

_SESSION_KEY = pytest.StashKey["P.Session"]()
_LEARN_KEY = pytest.StashKey[Any]()
_STATE_KEY = pytest.StashKey["ItemState"]()
_MODE_KEY = pytest.StashKey[str]()
_STATS_KEY = pytest.StashKey["Stats"]()


@dataclass
class ItemState:
    policy: Any = None
    sandbox: Any = None
    seed: int = 0
    env: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)
    denials: list = field(default_factory=list)
    clean_env: dict | None = None  # the whole environment of the confined body, when the policy sets it
    policy_key: str = ""  # the expanded fields the policy was built from (the policy and sandbox caches' key)


@dataclass
class Stats:
    confined: int = 0
    opted_out: list = field(default_factory=list)
    denied: dict = field(default_factory=dict)  # nodeid -> count
    missing: set = field(default_factory=set)
    crashed: list = field(default_factory=list)


# ---- options and ini ------------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandlock", "sandlock: run tests inside a Landlock + seccomp sandbox")
    group.addoption("--sandlock", action="store_true", dest="sandlock_all", default=None,
                    help="confine every test (with the ini sandlock_* defaults), not only marked ones")
    group.addoption("--sandlock-profile", metavar="NAME|PATH", dest="sandlock_profile", default=None,
                    help="confine every test under this saved profile (or TOML file); a marker on a test "
                         "refines it. Env: PYTEST_SANDLOCK_PROFILE. ini: sandlock_profile")
    group.addoption("--sandlock-off", action="store_true", dest="sandlock_off", default=False,
                    help="disable the plugin for this run: nothing is confined, markers are ignored")
    group.addoption("--sandlock-seed", metavar="N|last", dest="sandlock_seed", default=None,
                    help="session seed for per-test seeds (sandlock_seed fixture, random_seed=True); "
                         "'last' reuses the previous run's")
    group.addoption("--sandlock-strict", action="store_true", dest="sandlock_strict", default=None,
                    help="fail (instead of skip) tests whose policy needs a kernel feature that is missing")
    group.addoption("--sandlock-best-effort", action="store_true", dest="sandlock_best_effort", default=None,
                    help="apply what this kernel supports; the header says what is not in force")
    group.addoption("--sandlock-no-defaults", action="store_false", dest="sandlock_defaults", default=None,
                    help="do not add the interpreter, site-packages, rootdir, tmp_path... to filesystem rules")
    group.addoption("--sandlock-no-denials", action="store_false", dest="sandlock_denials", default=None,
                    help="do not record denials (saves one supervisor round trip per open/exec)")
    group.addoption("--sandlock-timeout", metavar="SECS", type=float, dest="sandlock_timeout", default=None,
                    help="kill a confined test (and everything it started) after SECS; ini sandlock_timeout")
    group.addoption("--sandlock-worker", action="store_true", dest="sandlock_worker", default=None,
                    help="run the tests whose policy is the session's (--sandlock-profile/ini, no marker) whole "
                         "(fixtures too) in one long-lived confined worker instead of a fork per test: faster; "
                         "tests in one worker share its process and basetemp. ini: sandlock_worker")
    group.addoption("--sandlock-learn", metavar="FILE", nargs="?", const="sandlock-learned.toml", default=None,
                    dest="sandlock_learn", help="run every test permissively, record what it does and write the "
                    "least-privilege profile to FILE (default sandlock-learned.toml)")
    group.addoption("--sandlock-learn-per-test", action="store_true", dest="sandlock_learn_per_test",
                    default=False, help="with --sandlock-learn: what one test alone needs becomes a marker "
                    "suggestion for it instead of a suite rule")
    group.addoption("--sandlock-learn-merge", action="store_true", dest="sandlock_learn_merge", default=False,
                    help="with --sandlock-learn: widen FILE instead of replacing it")

    parser.addini("sandlock_profile", "profile (name or TOML path) under which every test runs confined")
    parser.addini("sandlock_all", "confine every test (like --sandlock)", type="bool", default=False)
    parser.addini("sandlock_readable", "paths confined tests may read (project-wide fs_readable)",
                  type="linelist", default=[])
    parser.addini("sandlock_writable", "paths confined tests may write (project-wide fs_writable)",
                  type="linelist", default=[])
    parser.addini("sandlock_denied", "paths confined tests may not touch (project-wide fs_denied)",
                  type="linelist", default=[])
    parser.addini("sandlock_net_bind", "TCP ports confined tests may bind (project-wide net_bind)",
                  type="linelist", default=[])
    parser.addini("sandlock_net_connect", "TCP ports confined tests may connect to (project-wide net_connect)",
                  type="linelist", default=[])
    parser.addini("sandlock_policy", "other project-wide policy fields, one 'field = value' (TOML) a line",
                  type="linelist", default=[])
    parser.addini("sandlock_defaults", "add the interpreter, site-packages, rootdir, tmp_path, cache and "
                  "coverage dirs to filesystem rules (default true)", type="bool", default=True)
    parser.addini("sandlock_denials", "record and report denials (default true)", type="bool", default=True)
    parser.addini("sandlock_strict", "fail instead of skip when the kernel lacks a feature", type="bool",
                  default=False)
    parser.addini("sandlock_best_effort", "apply what the kernel supports", type="bool", default=False)
    parser.addini("sandlock_timeout", "kill a confined test after this many seconds (0: never)", default="0")
    parser.addini("sandlock_worker", "worker mode (like --sandlock-worker)", type="bool", default=False)
    parser.addini("sandlock_max_denials", "denials listed per failing test (default 20)", default="20")


def _opt(config, name, ini, kind=None):
    v = config.getoption(name, None)
    if v is not None:
        return v
    try:
        return config.getini(ini)
    except (ValueError, pytest.UsageError) as exc:  # a bad bool value: pytest's message would not name the key
        raise pytest.UsageError(f"ini {ini}: {config.inicfg.get(ini)!r} is not a boolean ({exc})") from None


def _session(config) -> P.Session:
    return config.stash[_SESSION_KEY]


def _configure_session(config) -> P.Session:
    s = P.Session()
    s.off = bool(config.getoption("sandlock_off", False))
    s.confine_all = bool(_opt(config, "sandlock_all", "sandlock_all"))
    prof = config.getoption("sandlock_profile", None)
    src = "--sandlock-profile"
    if not prof and os.environ.get("PYTEST_SANDLOCK_PROFILE"):
        prof, src = os.environ["PYTEST_SANDLOCK_PROFILE"], "$PYTEST_SANDLOCK_PROFILE"
    if not prof and config.getini("sandlock_profile"):
        prof, src = config.getini("sandlock_profile").strip(), "ini sandlock_profile"
    if prof:
        s.profile, s.profile_source = prof, src
    s.defaults = bool(_opt(config, "sandlock_defaults", "sandlock_defaults"))
    s.record_denials = bool(_opt(config, "sandlock_denials", "sandlock_denials"))
    s.strict = bool(_opt(config, "sandlock_strict", "sandlock_strict"))
    s.best_effort = bool(_opt(config, "sandlock_best_effort", "sandlock_best_effort"))
    t = config.getoption("sandlock_timeout", None)
    if t is None:
        try:
            t = float(config.getini("sandlock_timeout") or 0)
        except ValueError:
            raise pytest.UsageError(f"ini sandlock_timeout: {config.getini('sandlock_timeout')!r} is not a number")
    s.timeout = t if t and t > 0 else None
    try:
        s.max_shown = int(config.getini("sandlock_max_denials") or 20)
    except ValueError:
        s.max_shown = 20
    fields: dict = {}
    for ini, name in (("sandlock_readable", "fs_readable"), ("sandlock_writable", "fs_writable"),
                      ("sandlock_denied", "fs_denied"), ("sandlock_net_bind", "net_bind"),
                      ("sandlock_net_connect", "net_connect")):
        vals = [v for v in config.getini(ini) if v.strip()]
        if vals:
            if name.startswith("net_"):
                vals = [int(v) if v.strip().isdigit() else v.strip() for v in vals]
            fields[name] = vals
    try:
        fields.update(P.parse_policy_lines(config.getini("sandlock_policy")))
    except P.MarkerError as exc:
        raise pytest.UsageError(str(exc))
    s.ini_fields = fields
    s.seed, s.seed_source = _session_seed(config)
    return s


def _session_seed(config) -> tuple[int, str]:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "sandlock_seed" in workerinput:
        return int(workerinput["sandlock_seed"]), "controller"
    opt = config.getoption("sandlock_seed", None)
    cache = getattr(config, "cache", None)
    if opt == "last":
        last = cache.get("sandlock/seed", None) if cache is not None else None
        if last is None:
            raise pytest.UsageError("--sandlock-seed last: no previous run recorded a seed (see .pytest_cache)")
        seed, src = int(last), "last"
    elif opt is not None:
        try:
            seed, src = int(opt), "option"
        except ValueError:
            raise pytest.UsageError(f"--sandlock-seed: {opt!r} is not an integer or 'last'")
    else:
        seed, src = random.Random().getrandbits(32), "random"
    if cache is not None and workerinput is None:
        cache.set("sandlock/seed", seed)
    return seed, src


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sandbox(enabled=True, *, profile=None, **policy_fields): run this test confined by sandlock: the test "
        "body and every process it starts. Keywords are sandlock Policy fields; placeholders {tmp_path}, "
        "{rootdir}, {testdir}, {basetemp}, {cache_dir}, {worker_id}, {home}, {sys_prefix} expand per test. "
        "sandbox(False) opts the test out of session-wide confinement.")
    config.addinivalue_line("markers", "no_sandbox: run this test unconfined even under --sandlock-profile")
    config.stash[_SESSION_KEY] = s = _configure_session(config)
    if config.getoption("sandlock_learn", None) and not s.off:
        if config.getoption("numprocesses", None):
            raise pytest.UsageError("sandlock: --sandlock-learn does not support pytest-xdist (-n) yet")
        from sandlock_core.learn import PytestLearner
        s.confine_all, s.record_denials = True, False
        config.stash[_LEARN_KEY] = lrn = PytestLearner(
            config.getoption("sandlock_learn"), per_test=config.getoption("sandlock_learn_per_test"),
            merge=config.getoption("sandlock_learn_merge"))
        config.pluginmanager.register(lrn, "sandlock-learn")
    config.stash[_STATS_KEY] = Stats()
    _worker.configure(config, s, bool(_opt(config, "sandlock_worker", "sandlock_worker")),
                      config.stash.get(_LEARN_KEY, None) is not None)
    if not config.pluginmanager.has_plugin("sandlock-late-setup"):
        config.pluginmanager.register(_LateSetup(), "sandlock-late-setup")
    if s.profile and not s.off:
        try:
            fields = P.profile_fields(s.profile)
            P.check_field_names(fields, f"profile {s.profile!r}")
        except P.MarkerError as exc:
            raise pytest.UsageError(f"sandlock: {exc}")
        except Exception as exc:
            raise pytest.UsageError(f"sandlock: {s.profile_source} {s.profile!r}: {exc}")
    if s.ini_fields and not s.off:
        try:
            P.check_field_names(s.ini_fields, "ini sandlock_policy")
        except P.MarkerError as exc:
            raise pytest.UsageError(f"sandlock: {exc}")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist controller: every worker gets the same session seed (pytest-randomly's pattern)."""
    s = node.config.stash.get(_SESSION_KEY, None)
    if s is not None:
        node.workerinput["sandlock_seed"] = s.seed


# ---- header and summary ---------------------------------------------------------------------------------

def _mechanisms() -> tuple[int, list[str]]:
    try:
        from sandlock_core import landlock_abi_version
        abi = landlock_abi_version()
    except Exception:
        abi = 0
    mech = []
    if abi >= 1:
        mech.append("landlock-fs")
    if abi >= 4:
        mech.append("landlock-tcp")
    if abi >= 6:
        mech.append("landlock-scopes")
    mech.append("seccomp")
    return abi, mech


def _wants_header(config, s: P.Session) -> bool:
    if s.off:
        return config.getoption("sandlock_off", False)
    if s.active or config.getoption("sandlock_seed", None) is not None or s.ini_fields:
        return True
    if s.best_effort or s.strict:  # the user asked about kernel features: say what this kernel has
        return True
    return False


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    s = config.stash.get(_SESSION_KEY, None)
    if s is None or not _wants_header(config, s):
        return None
    if s.off:
        return ["sandlock: off (--sandlock-off): no test is confined"]
    from . import __version__
    abi, mech = _mechanisms()
    if s.record_denials:
        mech.append("denials mirrored by the supervisor")
    parts = [f"pytest-sandlock {__version__}", f"Landlock ABI {abi}" if abi else "Landlock unavailable",
             "mechanisms: " + ", ".join(mech)]
    if s.profile:
        parts.append(f"profile={s.profile}")
    elif s.confine_all:
        parts.append("all tests confined")
    parts.append(f"seed={s.seed} (replay: --sandlock-seed {s.seed})")
    lines = ["sandlock: " + "; ".join(parts)]
    mode = _worker.header(config)
    if mode:
        lines.append("sandlock: " + mode)
    if s.best_effort:
        gaps = _kernel_gaps(abi)
        if s.profile or s.ini_fields:
            missing = _session_missing(config, s)
            lines.append("sandlock: best effort: " + ("not in force on this kernel: " + ", ".join(missing)
                                                      if missing else "everything in the profile is in force"))
        lines.append("sandlock: best effort: " + ("this kernel lacks " + "; ".join(gaps) + " (markers that need "
                     "them run without; each test's gaps are listed in the summary and its sandlock_missing "
                     "property)" if gaps else "this kernel has every mechanism sandlock uses"))
    return lines


def _kernel_gaps(abi: int) -> list[str]:
    """The Landlock features this kernel does not have (what best effort may leave out)."""
    if abi < 1:
        return ["Landlock (filesystem rules, TCP port rules, IPC scopes)"]
    gaps = []
    if abi < 4:
        gaps.append(f"Landlock TCP port rules (ABI 4; this kernel has ABI {abi})")
    if abi < 6:
        gaps.append(f"Landlock IPC scopes (ABI 6; this kernel has ABI {abi})")
    return gaps


def _session_missing(config, s: P.Session) -> list[str]:
    try:
        from sandlock_core import Policy, Sandbox
        fields = dict(s.ini_fields)
        if s.profile:
            fields.update(P.profile_fields(s.profile))
        fields["best_effort"] = True
        mapping = _static_placeholders(config)
        fields = {k: v for k, v in fields.items() if not any(P.needs_placeholder(v, n) for n in ("tmp_path",
                                                                                                "testdir"))}
        fields = P.expand(fields, mapping, "profile")
        sb = Sandbox(Policy.from_dict(fields, source="profile"))
        try:
            return list(sb.missing)
        finally:
            sb.close()
    except Exception as exc:
        return [f"(could not tell: {exc})"]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    s = config.stash.get(_SESSION_KEY, None)
    st = config.stash.get(_STATS_KEY, None)
    if s is None or st is None or s.off or (not st.confined and not st.opted_out):
        return
    tr = terminalreporter
    if getattr(config, "workerinput", None) is not None:
        return
    lines = [f"{st.confined} test{'s' if st.confined != 1 else ''} ran confined; seed {s.seed} "
             f"(replay: --sandlock-seed {s.seed})"]
    if st.opted_out:
        lines.append(f"{len(st.opted_out)} test{'s' if len(st.opted_out) != 1 else ''} opted out and ran "
                     f"unconfined: " + ", ".join(st.opted_out[:10]) + (" ..." if len(st.opted_out) > 10 else ""))
    mode = _worker.summary(config)
    if mode:
        lines.append(mode)
    if st.denied:
        lines.append("denials: " + ", ".join(f"{k} ({v})" for k, v in list(st.denied.items())[:10]))
    if st.missing:
        lines.append("not in force on this kernel" + (" (best effort)" if s.best_effort else "") + ": "
                     + "; ".join(sorted(st.missing)))
    tr.write_sep("-", "sandlock")
    for line in lines:
        tr.write_line(line)


# ---- per-test policy -----------------------------------------------------------------------------------

_STATIC_KEY = pytest.StashKey[dict]()


def _static_placeholders(config) -> dict:
    """The placeholders that are the same for every test of the session (computed once)."""
    hit = config.stash.get(_STATIC_KEY, None)
    if hit is None:
        hit = config.stash[_STATIC_KEY] = _static_placeholders_uncached(config)
    return dict(hit)


def _static_placeholders_uncached(config) -> dict:
    cache_dir = None
    cache = getattr(config, "cache", None)
    if cache is not None:
        cache_dir = str(getattr(cache, "_cachedir", "") or "") or None
    basetemp = None
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        try:
            basetemp = str(factory.getbasetemp())
        except Exception:
            basetemp = None
    wi = getattr(config, "workerinput", None)
    return {"rootdir": str(config.rootpath), "cache_dir": cache_dir, "basetemp": basetemp,
            "worker_id": wi.get("workerid", "master") if wi else "master",
            "home": os.path.expanduser("~"), "sys_prefix": sys.prefix, "tmp_path": None, "testdir": None}


def _coverage_dir() -> str | None:
    mod = sys.modules.get("coverage")
    if mod is None:
        return None
    try:
        cov = mod.Coverage.current()
    except Exception:
        return None
    if cov is None:
        return None
    try:
        return os.path.dirname(os.path.abspath(cov.config.data_file))
    except Exception:
        return None


_FIELDS_KEY = pytest.StashKey[tuple]()


def _item_fields(item, s: P.Session) -> tuple[dict, str]:
    """Merged (unexpanded) policy fields for ``item`` and a description of where they came from."""
    hit = item.stash.get(_FIELDS_KEY, None)
    if hit is not None:
        return dict(hit[0]), hit[1]
    fields, where = _item_fields_uncached(item, s)
    item.stash[_FIELDS_KEY] = (fields, where)
    return dict(fields), where


def _item_fields_uncached(item, s: P.Session) -> tuple[dict, str]:
    mfields, mprofile, sources = P.marker_fields(item)
    pfn = mfields.pop("policy_fn", None)  # a callable, not a Policy field: Sandbox(policy, policy_fn=...)
    if pfn is not None and not callable(pfn):
        raise P.MarkerError(f"@pytest.mark.sandbox(policy_fn=...) on {item.nodeid} must be callable, got {pfn!r}")
    item.stash[_PFN_KEY] = pfn
    P.check_field_names(mfields, f"@pytest.mark.sandbox on {item.nodeid}")
    fields = dict(s.ini_fields)
    profile = mprofile or s.profile
    if profile:
        try:
            fields.update(P.profile_fields(profile))
        except Exception as exc:
            raise P.MarkerError(f"profile {profile!r}: {exc}")
    fields.update(mfields)
    where = ", ".join(sources) if sources else (f"profile {profile!r}" if profile else "sandlock ini defaults")
    return fields, where


def _resolve(item, s: P.Session, request=None) -> ItemState:
    """Build the effective policy for ``item`` (after its fixtures are set up: needs tmp_path)."""
    state = item.stash.get(_STATE_KEY, None)
    if state is not None and state.policy is not None:
        return state
    from sandlock_core import Policy
    from sandlock_core.errors import PolicyError
    fields, where = _item_fields(item, s)
    lrn = item.config.stash.get(_LEARN_KEY, None)
    if lrn is not None:
        fields = lrn.permissive(fields)
    seed = P.test_seed(s.seed, item.nodeid)
    rs = fields.get("random_seed")
    if rs is True or rs == "auto":
        fields["random_seed"] = seed
    elif isinstance(rs, int) and not isinstance(rs, bool):
        seed = rs
    config = item.config
    mapping = _static_placeholders(config)
    req = request if request is not None else getattr(item, "_request", None)
    restricts_fs = bool(fields.get("fs_readable") or fields.get("fs_writable"))
    tmp_path = None
    funcargs = getattr(item, "funcargs", None) or {}
    if "tmp_path" in funcargs or "tmpdir" in funcargs:   # the test asked for it: already made
        tmp_path = str(funcargs.get("tmp_path") or funcargs.get("tmpdir"))
    elif req and P.needs_placeholder(fields, "tmp_path"):
        try:
            tmp_path = str(req.getfixturevalue("tmp_path"))
        except Exception as exc:
            raise P.MarkerError(f"{where}: {{tmp_path}} could not be created: {exc}")
    mapping["tmp_path"] = tmp_path
    path = getattr(item, "path", None)
    mapping["testdir"] = str(path.parent) if path is not None else None
    fields = P.expand(fields, mapping, where)
    env: dict[str, str] = {}
    if restricts_fs and s.defaults:
        readable, writable = P.default_paths(mapping["rootdir"], mapping["cache_dir"], _coverage_dir())
        if mapping["testdir"]:
            readable = readable + [mapping["testdir"]]
        scratch = _scratch_dir(config)
        if tmp_path:
            writable = writable + [tmp_path]
        if scratch:
            writable = writable + [scratch]
        tmpdir = tmp_path or scratch
        if tmpdir:
            env["TMPDIR"] = tmpdir
        fields["fs_readable"] = P.merge_paths(fields.get("fs_readable"), readable)
        fields["fs_writable"] = P.merge_paths(fields.get("fs_writable"), writable)
    if s.best_effort:
        fields.setdefault("best_effort", True)
    if fields.get("workdir") is not None:  # a test leaves the tree as it found it unless told to commit
        fields.setdefault("on_exit", "abort")
        fields.setdefault("on_error", "abort")
    key = repr(sorted(fields.items()))
    cache = config.stash.setdefault(_POLICIES_KEY, {})
    hit = cache.get(key)
    if hit is None:
        try:
            policy = Policy.from_dict(fields, source=where)
        except PolicyError as exc:
            raise P.MarkerError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise P.MarkerError(f"{where}: {exc}") from None
        if len(cache) >= _MAX_CACHED_POLICIES:
            cache.pop(next(iter(cache)))
        hit = cache[key] = (policy, _child_environ(policy))
    if hit[1] is None and hit[0].random_seed is not None:  # the seeded getrandom library (seedrand.py)
        from sandlock_core import seedrand
        lib = seedrand.library(hit[0])
        if lib:
            preload = {b"LD_PRELOAD": os.environb.get(b"LD_PRELOAD", b"")}
            seedrand.add_to(preload, lib)
            env["LD_PRELOAD"] = os.fsdecode(preload[b"LD_PRELOAD"])
    state = ItemState(policy=hit[0], seed=seed, env=env, clean_env=hit[1], policy_key=key)
    item.stash[_STATE_KEY] = state
    return state


# Tests with the same expanded fields share one Policy (validation and the environment computed once) and,
# through policy_key, one Sandbox (_cached_sandbox: the plan compiled once).
_POLICIES_KEY = pytest.StashKey[dict]()
_MAX_CACHED_POLICIES = 256


def _child_environ(policy) -> dict | None:
    """The environment the policy gives its processes (clean_env, env), for the confined test body too:
    ``run_function`` forks without exec, so the plan's environment would otherwise reach only subprocesses."""
    if not policy.clean_env and not policy.env:
        return None
    try:
        from sandlock_core.plan import Plan
        env = Plan._build_env(policy)
        return {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}
    except Exception:
        env = dict(os.environ) if not policy.clean_env else {
            k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "USER", "LOGNAME", "TERM", "LANG")}
        env.update(policy.env)
        return env


_SCRATCH_KEY = pytest.StashKey[str]()


def _scratch_dir(config) -> str | None:
    """One writable scratch directory per session (per xdist worker), the TMPDIR of confined tests that do
    not use tmp_path: making a tmp_path for every test would cost ~2 ms each."""
    d = config.stash.get(_SCRATCH_KEY, None)
    if d is None:
        factory = getattr(config, "_tmp_path_factory", None)
        try:
            d = str(factory.mktemp("sandlock-tmp", numbered=True)) if factory is not None else ""
        except Exception:
            d = ""
        config.stash[_SCRATCH_KEY] = d
    return d or None


def _kernel_feature_error(exc) -> bool:
    """True for errors that say the kernel lacks something (skip), False for policy mistakes (fail)."""
    try:
        from sandlock_core import errors as E
    except Exception:
        return False
    kinds = tuple(getattr(E, n) for n in ("LandlockUnavailableError", "ConfinementError", "SeccompError",
                                          "NotifError", "FeatureUnavailableError") if hasattr(E, n))
    return isinstance(exc, kinds)


_SANDBOXES_KEY = pytest.StashKey[dict]()
_PFN_KEY = pytest.StashKey[object]()
_MAX_CACHED = 16


def _cached_sandbox(item, s: P.Session, state: ItemState):
    """Sandboxes are reusable (the plan is compiled once): tests with the same effective policy share one."""
    cache = item.config.stash.setdefault(_SANDBOXES_KEY, {})
    key = (state.policy_key or repr(state.policy), s.record_denials, id(item.stash.get(_PFN_KEY, None)))
    sb = cache.get(key)
    if sb is None:
        lrn = item.config.stash.get(_LEARN_KEY, None)
        sb = _make_sandbox(item, s, state, record_denials=s.record_denials,
                           handlers=lrn.handlers if lrn is not None else None)
        if len(cache) >= _MAX_CACHED:
            old = cache.pop(next(iter(cache)))
            old.close()
        cache[key] = sb
    return sb


def pytest_unconfigure(config) -> None:
    _worker.kill_all(config)
    for sb in config.stash.get(_SANDBOXES_KEY, {}).values():
        try:
            sb.close()
        except Exception:
            pass


def _make_sandbox(item, s: P.Session, state: ItemState, *, record_denials: bool, handlers=None):
    from sandlock_core import Sandbox
    from sandlock_core.errors import SandlockError
    try:
        return Sandbox(state.policy, record_denials=record_denials, handlers=handlers,
                       policy_fn=item.stash.get(_PFN_KEY, None))
    except SandlockError as exc:
        error = exc
    # outside the except block: the report shows the reason, not a chained traceback
    if not _kernel_feature_error(error):
        pytest.fail(f"sandlock: {error}", pytrace=False)
    if s.strict:
        pytest.fail(f"sandlock (--sandlock-strict): this kernel cannot enforce the policy: {error}", pytrace=False)
    pytest.skip(f"sandlock: this kernel cannot enforce the policy: {error} (--sandlock-best-effort runs it with "
                f"what the kernel has)")


# ---- the protocol ---------------------------------------------------------------------------------------

def _mode(item) -> str:
    mode = item.stash.get(_MODE_KEY, None)
    if mode is None:
        s = item.config.stash.get(_SESSION_KEY, None)
        mode = P.UNCONFINED if s is None else P.item_mode(item, s)
        item.stash[_MODE_KEY] = mode
    return mode


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Before fixtures: reject bad marker arguments early (no fixture runs for a test that cannot run)."""
    if _worker_child.IN_WORKER or _mode(item) != P.CONFINED:
        return
    s = _session(item.config)
    try:
        fields, where = _item_fields(item, s)
    except P.MarkerError as exc:
        pytest.fail(f"sandlock: {exc}", pytrace=False)


class _LateSetup:
    """After the fixtures: resolve the policy (needs tmp_path) and build the Sandbox, at setup time, so a
    policy error is the test's setup failure and a missing kernel feature its skip."""

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_setup(self, item) -> None:
        if _worker_child.IN_WORKER or _mode(item) != P.CONFINED:  # the worker is confined already
            return
        s = _session(item.config)
        try:
            state = _resolve(item, s)
        except P.MarkerError as exc:
            pytest.fail(f"sandlock: {exc}", pytrace=False)
        if state.sandbox is None:
            state.sandbox = _cached_sandbox(item, s, state)
            state.missing = list(getattr(state.sandbox, "missing", []) or [])


def _timeout_for(item, s: P.Session) -> tuple[float | None, str]:
    timeout, src = s.timeout, "sandlock_timeout" if s.timeout else ""
    pt = item.config.pluginmanager.get_plugin("timeout")
    if pt is not None and hasattr(pt, "_get_item_settings"):
        try:
            settings = pt._get_item_settings(item)
            if settings.timeout and settings.timeout > 0 and (timeout is None or settings.timeout < timeout):
                timeout, src = float(settings.timeout), "pytest-timeout"
        except Exception:
            pass
    return timeout, src


def pytest_runtest_protocol(item, nextitem):
    mode = _mode(item)
    own_next = nextitem
    if _worker.enabled(item.config):
        if mode == P.CONFINED and _worker.eligible(item) and _worker.protocol(item, nextitem):
            return True
        # this process's own next item: its teardown must not keep fixtures for a test the worker runs
        own_next = _worker.following(item, nextitem, False)
        _worker.tear_down_foreign(item)
    if mode == P.OPTED_OUT:
        st = item.config.stash[_STATS_KEY]
        st.opted_out.append(item.nodeid)
        item.user_properties.append(("sandlock", "opted out: ran unconfined"))
    if mode != P.CONFINED:  # pytest's own protocol (or other plugins'), unless the nextitem must change
        return None if own_next is nextitem else _unconfined_protocol(item, own_next)
    nextitem = own_next
    from _pytest.runner import call_and_report, show_test_item
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    hasrequest = hasattr(item, "_request")
    if hasrequest and not item._request:
        item._initrequest()
    try:
        rep = call_and_report(item, "setup", True)
        if rep.passed:
            setup_only = item.config.getoption("setuponly", False)
            if item.config.getoption("setupshow", False):
                show_test_item(item, add_space=not setup_only)
            if not setup_only:
                _confined_call(item)
        if item.session.shouldfail or item.session.shouldstop:
            nextitem = None
        call_and_report(item, "teardown", True, nextitem=nextitem)
    finally:
        state = item.stash.get(_STATE_KEY, None)
        if state is not None:
            state.sandbox = None  # cached per session (_cached_sandbox), closed at unconfigure
        if hasrequest:
            item._request = False
            item.funcargs = None
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _unconfined_protocol(item, nextitem) -> bool:
    """pytest's own protocol, with the nextitem worker mode chose (pytest's may be a worker's test)."""
    from _pytest.runner import runtestprotocol
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    runtestprotocol(item, nextitem=nextitem)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_sessionfinish(session) -> None:
    _worker.finish(session)  # the worker's remaining teardowns, then it is reaped


def _confined_call(item) -> None:
    s = _session(item.config)
    st = item.config.stash[_STATS_KEY]
    state = item.stash[_STATE_KEY]
    st.confined += 1
    st.missing.update(state.missing)
    if state.missing:
        item.user_properties.append(("sandlock_missing", "; ".join(state.missing)))
    timeout, tsrc = _timeout_for(item, s)
    fd = os.memfd_create("sandlock-report", os.MFD_CLOEXEC)
    lrn = item.config.stash.get(_LEARN_KEY, None)
    if lrn is not None:
        lrn.begin(item, state)
    server = _runner.ChangesServer(state.sandbox) if state.policy.workdir is not None else None
    try:
        result = state.sandbox.run_function(_runner.child_main, item, fd, state.env, state.clean_env,
                                            server.child_fds if server else None, timeout=timeout)
        messages = _runner.read_messages(fd)
    finally:
        os.close(fd)
        if server is not None:
            server.close()
        if lrn is not None:
            lrn.end(item, state)
    denials = R.denial_dicts(getattr(result, "denials", []) or [])
    report = None
    changes = None
    config = item.config
    for m in messages:
        kind = m.get("kind")
        if kind == "changes":
            changes = m.get("data") if "data" in m else f"(not listed: {m.get('error')})"
        elif kind == "report":
            report = _runner.fix_report(config.hook.pytest_report_from_serializable(config=config, data=m["data"]))
        elif kind == "warning":
            config.hook.pytest_warning_recorded.call_historic(kwargs=dict(
                warning_message=_runner.warning_from_dict(m["data"]), when="runtest", nodeid=item.nodeid,
                location=None))
        elif kind == "exit":
            pytest.exit(m.get("msg", ""), m.get("returncode"))
        elif kind == "interrupt":
            raise KeyboardInterrupt
    if report is None:
        st.crashed.append(item.nodeid)
        report = _crash_report(item, R.describe_result(result, timeout=timeout, timeout_source=tsrc), denials, s)
    else:
        item.user_properties[:] = list(report.user_properties)
        _decorate(item, report, denials, s)
    if denials:
        st.denied[item.nodeid] = R.total(denials)
        item.user_properties.append(("sandlock_denials", R.junit_value(denials)))
    if changes is not None:
        _add_changes(item, report, changes, state.policy)
    audits = getattr(result, "audit", None) or []
    if audits:  # policy_fn "audit" verdicts: allowed, but flagged in the report
        lines = [f"{getattr(e, 'syscall', '?')} {getattr(e, 'path', None) or getattr(e, 'host', None) or ''}"
                 f" pid {getattr(e, 'pid', '?')}".rstrip() for e in audits[:s.max_shown]]
        report.sections.append(("sandlock audit", "\n".join(lines)))
        item.user_properties.append(("sandlock_audit", "; ".join(lines)))
    item.user_properties.append(("sandlock_seed", state.seed))
    item.ihook.pytest_runtest_logreport(report=report)


def _add_changes(item, report, changes, policy) -> None:
    """A workdir's copy-on-write changes as of the end of the test body: a report section and a JUnit
    property. What became of them (commit, discard, keep) is the policy's on_exit / on_error."""
    if isinstance(changes, str):
        text = changes
    else:
        text = "\n".join(f"  {k} {p}" for k, p in changes[:200]) or "  (none)"
        if len(changes) > 200:
            text += f"\n  ... and {len(changes) - 200} more"
    field = "on_error" if report.failed else "on_exit"   # the child's exit status chose the same way
    action = getattr(getattr(policy, field), "value", getattr(policy, field))
    fate = {"abort": "discarded", "commit": "committed", "keep": "kept"}.get(action, action)
    report.sections.append(("sandlock changes", f"under {policy.workdir}, {fate} ({field}={action}):\n" + text))
    if not isinstance(changes, str):
        import json
        item.user_properties.append(("sandlock_changes", json.dumps(changes[:200])))


def _decorate(item, report, denials: list[dict], s: P.Session) -> None:
    if not denials:
        return
    report.sections.append((R.SECTION, R.format_section(denials, limit=s.max_shown)))
    if report.failed:
        note = f"[sandlock: {R.total(denials)} denied]"
        lr = report.longrepr
        crash = getattr(lr, "reprcrash", None)
        if crash is not None and getattr(crash, "message", None) is not None:
            crash.message = note + " " + crash.message   # first: survives the short summary's truncation
        elif isinstance(lr, str):
            report.longrepr = note + " " + lr


def _crash_report(item, message: str, denials: list[dict], s: P.Session):
    """A failed call report for a child that died without reporting (xfail still applies)."""
    from _pytest.runner import CallInfo
    if denials:
        message = f"[sandlock: {R.total(denials)} denied] {message}"

    def fail():
        pytest.fail(message, pytrace=False)

    call = CallInfo.from_call(fail, when="call")
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    if denials:
        report.sections.append((R.SECTION, R.format_section(denials, limit=s.max_shown)))
    return report


# ---- pytest-timeout -------------------------------------------------------------------------------------

@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item, settings):
    """A confined test's timeout is enforced by the sandbox (it kills the whole process tree and the test
    fails with 'Timeout'); pytest-timeout's own timer (which would end the session) is not armed."""
    if _runner.IN_CHILD or _mode(item) == P.CONFINED:
        return True
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item):
    if _runner.IN_CHILD or _mode(item) == P.CONFINED:
        return True
    return None


# ---- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture
def sandbox_policy(request) -> Any:
    """The test's effective sandlock ``Policy`` (marker, profile, ini and defaults merged)."""
    item = request.node
    s = _session(request.config)
    try:
        return _resolve(item, s, request).policy
    except P.MarkerError as exc:
        pytest.fail(f"sandlock: {exc}", pytrace=False)


@pytest.fixture
def sandbox(request, sandbox_policy):
    """A ``sandlock_core.Sandbox`` for the test's effective policy: ``sandbox.run(["cmd", ...])``.

    Inside a confined test whose sandbox has a supervisor, the kernel allows only one seccomp listener per
    process tree, so this sandbox records no denials of its own (those of the outer one are reported)."""
    s = _session(request.config)
    state = request.node.stash[_STATE_KEY]
    record = s.record_denials and _mode(request.node) != P.CONFINED
    sb = _make_sandbox(request.node, s, state, record_denials=record)
    try:
        yield sb
    finally:
        sb.close()


class SandboxChanges:
    """The ``sandbox_changes`` fixture: call it inside a confined test with a ``workdir`` to get what the test
    (and every process it started) has changed in its copy-on-write view so far, as a sorted list of
    ``sandlock_core.Change(kind, path)``: kind ``A`` added, ``M`` modified, ``D`` deleted; ``path`` relative
    to the workdir; contents compared, as ``Sandbox.dry_run`` reports them."""

    def __init__(self, workdir: str):
        self.workdir = workdir

    def __call__(self) -> list:
        if not _runner.IN_CHILD or _runner.CHANNEL is None:
            raise RuntimeError("sandbox_changes() works only inside the confined test body")
        return _runner.CHANNEL.query()

    def __repr__(self) -> str:
        return f"<sandbox_changes under {self.workdir}>"


@pytest.fixture
def sandbox_changes(request) -> SandboxChanges:
    """Copy-on-write: with ``@pytest.mark.sandbox(workdir=...)`` the test runs against a COW view of that
    tree (writes land in a private upper layer; the tree itself changes only with ``on_exit="commit"``).
    ``sandbox_changes()`` lists what changed so far: ``[Change("A", "out.txt"), Change("M", "setup.cfg")]``."""
    item = request.node
    s = _session(request.config)
    if _mode(item) != P.CONFINED:
        pytest.fail("sandlock: sandbox_changes needs a confined test with a workdir: "
                    "@pytest.mark.sandbox(workdir=...)", pytrace=False)
    try:
        policy = _resolve(item, s, request).policy
    except P.MarkerError as exc:
        pytest.fail(f"sandlock: {exc}", pytrace=False)
    if policy.workdir is None:
        pytest.fail("sandlock: sandbox_changes needs a workdir in the test's policy: "
                    "@pytest.mark.sandbox(workdir=\"{tmp_path}/repo\") or a path", pytrace=False)
    return SandboxChanges(policy.workdir)


@pytest.fixture
def sandlock_seed(request) -> int:
    """This test's seed: the marker's ``random_seed``, else derived from the session seed (``--sandlock-seed``)
    and the test id. Replay a failure with the seed printed in the header and summary."""
    s = _session(request.config)
    try:
        return _resolve(request.node, s, request).seed if _mode(request.node) == P.CONFINED else \
            _seed_only(request.node, s)
    except P.MarkerError as exc:
        pytest.fail(f"sandlock: {exc}", pytrace=False)


def _seed_only(item, s: P.Session) -> int:
    try:
        fields, _ = _item_fields(item, s)
    except P.MarkerError:
        fields = {}
    rs = fields.get("random_seed")
    if isinstance(rs, int) and not isinstance(rs, bool):
        return rs
    return P.test_seed(s.seed, item.nodeid)


@pytest.fixture
def sandbox_faker(sandlock_seed):
    """A ``faker.Faker`` seeded from ``sandlock_seed``: test data and sandboxed randomness from one seed."""
    faker = pytest.importorskip("faker", reason="sandbox_faker needs Faker (pip install 'pytest-sandlock[faker]')")
    fake = faker.Faker()
    fake.seed_instance(sandlock_seed)
    return fake
