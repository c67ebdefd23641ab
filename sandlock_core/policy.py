"""``Policy``: what a sandbox may do. A frozen dataclass, validated and normalised at construction, so
every consumer reads plain values (bytes as int, ports as sorted tuples, times as epoch floats, paths as
absolute strings, enums as members). A bad value raises ``PolicyError`` naming the field, the value and why.

The fields, defaults and validators live in ``policy_spec`` (no heavy imports: ``sandlock run`` uses them
without ``dataclasses``); this module builds the dataclass from that table.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._enum import Enum as _LiteEnum
from . import policy_spec as _spec
from .errors import PolicyError
from .policy_spec import (MAX_CPU_NUMBER, BranchAction, FsIsolation, parse_cpu_list, parse_ports,  # noqa: F401
                          parse_size, parse_time)

__all__ = ["Policy", "FsIsolation", "BranchAction", "PolicyError", "parse_size", "parse_ports", "parse_time",
           "parse_cpu_list", "MAX_CPU_NUMBER"]


def _fields_from_table(cls):
    """Give ``cls`` the annotations and defaults of ``policy_spec.FIELDS``, for ``dataclass`` to pick up."""
    cls.__annotations__ = {name: annotation for name, annotation, _ in _spec.FIELDS}
    for name, _, default in _spec.FIELDS:
        setattr(cls, name, field(default_factory=default) if name in _spec.FACTORY_FIELDS else default)
    return cls


@dataclass(frozen=True, eq=True)
@_fields_from_table
class Policy:
    """What a sandbox may do. Construction validates every field and normalises it in place:

    * path lists (``fs_*``) -> tuple of absolute, normalised str (a single str or PathLike is one path);
      single paths (``cwd``, ``workdir``, ``fs_storage``, ``chroot``) -> str or None
    * ``net_bind``/``net_connect`` -> sorted tuple of int; ``net_allow_hosts`` -> tuple of str or None
    * ``max_memory``/``max_disk`` -> int bytes or None; ``time_start`` -> float epoch seconds or None
    * ``cpu_cores`` -> sorted tuple of int or None; syscall lists -> tuple of str or None
    * ``env`` -> read-only mapping (``types.MappingProxyType``) of str to str
    * ``fs_isolation``/``on_exit``/``on_error`` -> enum members

    Policies compare by value (``env`` by content) but are not hashable, because ``env`` is a mapping.
    """

    __hash__ = None  # env is a mapping: policies compare by value but are not hashable

    def __post_init__(self):
        values = _spec.normalise({name: getattr(self, name) for name in _spec.FIELD_NAMES})
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __eq__(self, other):
        if not isinstance(other, Policy):
            return NotImplemented
        return all(_plain(getattr(self, f.name)) == _plain(getattr(other, f.name)) for f in dataclasses.fields(self))

    # ---- construction helpers ----
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_names(cls, names, source: str | None = None) -> None:
        _spec.check_names(names, source)

    @classmethod
    def from_dict(cls, d: Mapping, source: str | None = None) -> "Policy":
        """A Policy from plain values (a profile, CLI flags); ``source`` prefixes every error message."""
        values = _spec.checked_dict(d, source)
        try:
            return cls(**values)
        except PolicyError as exc:
            if source:
                raise PolicyError(f"{source}: {exc}") from None
            raise

    def replace(self, **changes) -> "Policy":
        self.check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self, only_changed: bool = True) -> dict:
        """Plain TOML-friendly values (lists, strings, numbers, a table for env); None values are left out."""
        out = {}
        default = Policy() if only_changed else None
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if default is not None and _plain(v) == _plain(getattr(default, f.name)):
                continue
            out[f.name] = _plain(v)
        return out


def _plain(v):
    if isinstance(v, (enum.Enum, _LiteEnum)):
        return v.value
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Mapping):
        return dict(v)
    return v
