"""sandlock_core: a Linux process sandbox on Landlock and seccomp, without root.

    from sandlock_core import Sandbox, Policy
    result = Sandbox(Policy(fs_readable=["/usr", "/lib"])).run(["ls", "/usr"])

Names are imported lazily so that ``sandlock run`` only pays for what it uses.
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "Policy": "policy", "FsIsolation": "policy", "BranchAction": "policy", "parse_ports": "policy",
    "parse_size": "policy", "parse_time": "policy",
    "Sandbox": "sandbox", "Result": "sandbox", "DryRunResult": "sandbox", "Change": "sandbox", "ExitReason": "sandbox", "confine": "sandbox",
    "landlock_abi_version": "sandbox",
    "Stage": "pipeline", "Pipeline": "pipeline", "PipelineResult": "pipeline", "Process": "process",
    "SyscallEvent": "policy_fn", "PolicyContext": "policy_fn", "ForkResult": "forking", "Clone": "forking",
    "ForkError": "forking",
    "load_profile": "profile", "list_profiles": "profile", "save_profile": "profile",
    "SandlockError": "errors", "PolicyError": "errors", "SandboxError": "errors",
    "ConfinementError": "errors", "LandlockUnavailableError": "errors", "SeccompError": "errors",
    "NotifError": "errors", "ChildError": "errors", "BranchError": "errors", "BranchConflictError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandlock_core' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
