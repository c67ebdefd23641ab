"""A small enumeration type for sandlock's own enums (FsIsolation, BranchAction, ExitReason).

Why not ``enum.Enum``: importing ``enum`` pulls in ``functools`` and ``collections``, about 4 ms of every
``sandlock run``'s start-up, for three tiny tables. Members behave as the stdlib's do where sandlock's users
can tell: singletons compared with ``is``, ``.name`` and ``.value``, ``Cls(value)`` and ``Cls[name]``
lookups (ValueError / KeyError otherwise), iteration in definition order, ``len``, ``in``, hashing, a repr
like ``<ExitReason.KILLED: 'killed'>``, and pickling/copying that return the very member. What differs:
they are not ``enum.Enum`` instances.
"""
from __future__ import annotations


class _EnumType(type):
    def __new__(mcls, name, bases, ns):
        members = [(k, v) for k, v in ns.items() if not k.startswith("_") and not _is_descriptor(v)]
        for k, _ in members:
            del ns[k]
        cls = super().__new__(mcls, name, bases, ns)
        by_name: dict = {}
        by_value: dict = {}
        for k, v in members:
            member = object.__new__(cls)
            member._name_, member._value_ = k, v
            by_name[k] = member
            by_value.setdefault(v, member)
            type.__setattr__(cls, k, member)
        type.__setattr__(cls, "_member_map_", by_name)
        type.__setattr__(cls, "_value2member_map_", by_value)
        return cls

    def __call__(cls, value):
        if isinstance(value, cls):
            return value
        try:
            return cls._value2member_map_[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

    def __getitem__(cls, name):
        return cls._member_map_[name]

    def __iter__(cls):
        return iter(cls._member_map_.values())

    def __len__(cls):
        return len(cls._member_map_)

    def __contains__(cls, member):
        return isinstance(member, cls) and cls._member_map_.get(member._name_) is member

    def __setattr__(cls, name, value):
        if name in cls.__dict__.get("_member_map_", ()):
            raise AttributeError(f"cannot reassign member {name!r}")
        super().__setattr__(name, value)

    def __repr__(cls):
        return f"<enum {cls.__name__!r}>"


def _is_descriptor(v) -> bool:
    return callable(v) or hasattr(v, "__get__")


class Enum(metaclass=_EnumType):
    __slots__ = ("_name_", "_value_")

    @property
    def name(self) -> str:
        return self._name_

    @property
    def value(self):
        return self._value_

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._name_}: {self._value_!r}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self._name_}"

    def __hash__(self) -> int:
        return hash(self._name_)

    def __reduce__(self):
        return type(self), (self._value_,)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
