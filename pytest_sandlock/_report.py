"""Denials as a report section, a short-summary note and JUnit properties."""
from __future__ import annotations

import errno as _errno
import json
import signal as _signal

SECTION = "sandlock denials"


def _get(d, name, default=""):
    if isinstance(d, dict):
        return d.get(name, default)
    return getattr(d, name, default)


def denial_dicts(denials) -> list[dict]:
    out = []
    for d in denials:
        if isinstance(d, dict):
            out.append(dict(d))
            continue
        try:
            item = d.as_dict()
        except Exception:
            item = {"syscall": _get(d, "syscall"), "pid": _get(d, "pid", 0), "errno": _get(d, "errno"),
                    "detail": _get(d, "detail"), "hint": _get(d, "hint")}
        if isinstance(item.get("errno"), int):
            item["errno"] = _errno.errorcode.get(item["errno"], str(item["errno"]))
        item.setdefault("count", 1)
        item.setdefault("source", "supervisor")
        out.append(item)
    return out


def total(items: list[dict]) -> int:
    return sum(int(i.get("count", 1) or 1) for i in items)


def _suggestion(items: list[dict]) -> str:
    """One marker that would allow every listed denial (from the hints ``field += [value]``)."""
    fields: dict[str, list] = {}
    for it in items:
        hint = it.get("hint") or ""
        if " += [" not in hint:
            continue
        name, _, rest = hint.partition(" += [")
        value = rest.split("]", 1)[0]
        fields.setdefault(name.strip(), [])
        if value not in fields[name.strip()]:
            fields[name.strip()].append(value)
    if not fields:
        return ""
    args = ", ".join(f"{k}=[..., {', '.join(v)}]" for k, v in sorted(fields.items()))
    return f"to allow all of them: @pytest.mark.sandbox({args})"


def format_section(items: list[dict], *, limit: int = 20, mirrored_note: bool = True, dropped: int = 0) -> str:
    n = total(items)
    lines = [f"{n} operation{'s' if n != 1 else ''} refused"
             + (f" ({len(items)} distinct)" if len(items) != n else "") + ":"]
    rows = []
    for it in items[:limit]:
        target = it.get("detail") or ""
        who = f"pid {it.get('pid', '?')}" + (f" ({it['comm']})" if it.get("comm") else "")
        what = it.get("syscall", "?") + (f" [{it['access']}]" if it.get("access") not in (None, "", it.get("syscall"))
                                         else "")
        count = int(it.get("count", 1) or 1)
        rows.append((what, target, str(it.get("errno", "")), who, (f"x{count}" if count > 1 else ""),
                     it.get("hint") or "", it.get("source") or ""))
    if rows:
        w = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            line = f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:<{w[3]}}"
            if w[4]:
                line += f"  {r[4]:<{w[4]}}"
            if r[5]:
                line += f"  -> {r[5]}"
            lines.append(line.rstrip())
    more = len(items) - len(rows) + dropped
    if more > 0:
        lines.append(f"  ... and {more} more (see the sandlock_denials property in JUnit XML)")
    sugg = _suggestion(items)
    if sugg:
        lines.append(sugg)
    if mirrored_note and any(it.get("source") == "landlock" for it in items):
        lines.append("(Landlock refusals are mirrored by the sandlock supervisor: it checks each open/exec/"
                     "mkdir/unlink/rename/bind/connect against the policy, as the kernel does)")
    return "\n".join(lines)


def junit_value(items: list[dict], limit: int = 50) -> str:
    keep = ("syscall", "access", "detail", "errno", "pid", "comm", "hint", "count", "source")
    return json.dumps([{k: it[k] for k in keep if k in it} for it in items[:limit]], sort_keys=True)


def describe_result(result, *, timeout: float | None, timeout_source: str) -> str:
    """Why the confined child ended without a report, from the supervisor's Result (not a guess)."""
    reason = getattr(getattr(result, "reason", None), "value", str(getattr(result, "reason", "")))
    err = getattr(result, "error", None)
    if reason == "timeout":
        src = f" from {timeout_source}" if timeout_source else ""
        t = f" (>{timeout:g}s)" if timeout else ""
        return (f"Timeout{t}{src}: sandlock killed the confined test and every process it started "
                f"(after {result.wall_time:.2f}s)")
    if reason == "setup_failed":
        return f"sandlock could not confine the test: {err}"
    sig = getattr(result, "signal", None)
    if sig:
        try:
            name = _signal.Signals(sig).name
            desc = _signal.strsignal(sig) or ""
        except (ValueError, AttributeError):
            name, desc = f"signal {sig}", ""
        msg = f"the confined test process was killed by {name}" + (f" ({desc})" if desc else "")
        if reason == "killed" or err:
            msg += f": {err or 'killed by the sandbox'}"
        elif sig == _signal.SIGSEGV:
            msg += ": the test (or a C extension it called) crashed"
        return msg
    code = getattr(result, "exit_code", None)
    extra = f": {err}" if err else ""
    return (f"the confined test process exited with status {code} before reporting a result "
            f"(os._exit(), or pytest's own machinery failed in the child){extra}")
