"""The exception tree users of the seed README know.

SandlockError
├─ PolicyError            a policy field, flag or profile key is wrong (also a ValueError)
└─ SandboxError
   ├─ ConfinementError
   │  ├─ LandlockUnavailableError
   │  └─ SeccompError
   │     └─ NotifError
   ├─ ChildError          the child failed before or at exec
   └─ BranchError         copy-on-write commit problems
      └─ BranchConflictError
"""


class SandlockError(Exception):
    """Base of every sandlock error."""


class PolicyError(SandlockError, ValueError):
    """A policy value is wrong; the message names the field, the value and why."""


class SandboxError(SandlockError):
    """The sandbox could not be set up or run."""


class ConfinementError(SandboxError):
    """A confinement mechanism could not be applied."""


class LandlockUnavailableError(ConfinementError):
    """The kernel's Landlock lacks what the policy asks for."""


class SeccompError(ConfinementError):
    """The seccomp filter could not be installed."""


class NotifError(SeccompError):
    """Seccomp user notification (the supervisor's channel) failed."""


class ChildError(SandboxError):
    """The sandboxed child failed before running the command."""


class BranchError(SandboxError):
    """A copy-on-write branch could not be committed or aborted."""


class BranchConflictError(BranchError):
    """Another sandbox is committing to the same workdir."""
