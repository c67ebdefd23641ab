"""``dataclass`` for the small records on ``sandlock run``'s path, without importing ``dataclasses``.

``import dataclasses`` costs ~10 ms of every CLI start (it imports ``inspect``, ``re`` and ``copy``): more
than the rest of ``sandlock run``'s own imports together. This decorator writes the methods the real one
would write for a plain record, from the class's annotations: ``__init__`` (defaults, ``field(default=...)``,
``field(default_factory=...)``, ``__post_init__``), ``__repr__``, ``__eq__``, ``__match_args__``, and for
``frozen=True`` ``__setattr__``/``__delattr__`` raising ``dataclasses.FrozenInstanceError`` and a field-tuple
``__hash__`` (without ``frozen``, ``__hash__`` is None, as with the real decorator).

The records stay dataclasses for their users: ``__dataclass_fields__`` and ``__dataclass_params__`` are lazy
attributes that import ``dataclasses`` on first access and answer with the fields and parameters the real
decorator gives the same class, so ``dataclasses.fields``/``asdict``/``astuple``/``replace``/``is_dataclass``
work as before. Anything beyond a plain record (other options, inheritance, ``ClassVar``/``InitVar``/``KW_ONLY``,
explicit dunders, a mutable default, a non-default field after a default one) goes to the real decorator.
"""
from __future__ import annotations

_MISSING = object()


class _Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default, default_factory):
        self.default = default
        self.default_factory = default_factory


def field(*, default=_MISSING, default_factory=_MISSING, **options):
    """``dataclasses.field`` for the two uses records have; any other option returns the real one."""
    if options or (default is not _MISSING and default_factory is not _MISSING):
        import dataclasses
        kw = {k: v for k, v in (("default", default), ("default_factory", default_factory)) if v is not _MISSING}
        return dataclasses.field(**kw, **options)
    return _Field(default, default_factory)


def dataclass(cls=None, /, *, frozen: bool = False, **options):
    def wrap(cls):
        spec = None if options else _plain_record(cls)
        if spec is None:
            import dataclasses
            for name, value in list(vars(cls).items()):
                if isinstance(value, _Field):
                    setattr(cls, name, _real_field(value))
            return dataclasses.dataclass(cls, frozen=frozen, **options)
        return _install(cls, frozen, *spec)
    return wrap if cls is None else wrap(cls)


_OWN = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__", "__slots__",
        "__match_args__", "__dataclass_fields__", "__dataclass_params__")


def _plain_record(cls):
    """(names, defaults, factories) when ``cls`` is a plain record this module can handle, else None."""
    annotations = cls.__dict__.get("__annotations__", {})
    if cls.__bases__ != (object,) or any(name in cls.__dict__ for name in _OWN):
        return None
    names, defaults, factories = tuple(annotations), {}, {}
    for name in names:
        kind = annotations[name]
        if not isinstance(kind, str) or any(w in kind for w in ("ClassVar", "InitVar", "KW_ONLY")):
            return None
        value = cls.__dict__.get(name, _MISSING)
        if isinstance(value, _Field):
            value, factory = value.default, value.default_factory
            if factory is not _MISSING:
                factories[name] = factory
                continue
        elif type(value).__name__ == "Field":  # a real dataclasses.Field
            return None
        if value is not _MISSING:
            if type(value).__hash__ is None:  # a mutable default: the real decorator's ValueError
                return None
            defaults[name] = value
        elif defaults or factories:  # non-default after default: the real decorator's TypeError
            return None
    return names, defaults, factories


def _install(cls, frozen: bool, names: tuple, defaults: dict, factories: dict):
    for name in names:  # as the real decorator leaves them: class attributes hold plain defaults only
        if name in defaults:
            setattr(cls, name, defaults[name])
        elif name in cls.__dict__:
            delattr(cls, name)
    cls.__init__ = _make_init(cls, names, defaults, factories, frozen)
    cls.__repr__ = _make_repr(names)
    cls.__eq__ = _make_eq(names)
    cls.__match_args__ = names
    if frozen:
        cls.__hash__ = _make_hash(names)
        cls.__setattr__, cls.__delattr__ = _frozen_methods(cls, names)
    else:
        cls.__hash__ = None
    cls.__dataclass_fields__ = _LazyMeta(cls, "__dataclass_fields__", names, defaults, factories, frozen)
    cls.__dataclass_params__ = _LazyMeta(cls, "__dataclass_params__", names, defaults, factories, frozen)
    return cls


def _make_init(cls, names, defaults, factories, frozen):
    params, body = [], []
    env = {"_MISSING": _MISSING, "_setattr": object.__setattr__}
    for name in names:
        if name in factories:
            env[f"_factory_{name}"] = factories[name]
            params.append(f"{name}=_MISSING")
            value = f"_factory_{name}() if {name} is _MISSING else {name}"
        else:
            if name in defaults:
                env[f"_default_{name}"] = defaults[name]
                params.append(f"{name}=_default_{name}")
            else:
                params.append(name)
            value = name
        body.append(f"    _setattr(self, {name!r}, {value})" if frozen else f"    self.{name} = {value}")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"])
    exec(source, env)  # noqa: S102 - generated from annotation names, as dataclasses does
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _make_repr(names):
    def __repr__(self):
        return f"{self.__class__.__qualname__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"
    return __repr__


def _make_eq(names):
    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)
        return NotImplemented
    return __eq__


def _make_hash(names):
    def __hash__(self):
        return hash(tuple(getattr(self, n) for n in names))
    return __hash__


def _frozen_methods(cls, names):
    fields = frozenset(names)

    def __setattr__(self, name, value):
        if type(self) is cls or name in fields:
            from dataclasses import FrozenInstanceError
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self, name):
        if type(self) is cls or name in fields:
            from dataclasses import FrozenInstanceError
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)
    return __setattr__, __delattr__


def _real_field(f: _Field):
    import dataclasses
    if f.default_factory is not _MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    if f.default is not _MISSING:
        return dataclasses.field(default=f.default)
    return dataclasses.field()


class _LazyMeta:
    """``__dataclass_fields__``/``__dataclass_params__`` computed on first access: those of the real decorator
    applied to a twin class with the same fields, stored on ``cls`` in place of this descriptor."""

    def __init__(self, cls, attr, names, defaults, factories, frozen):
        self.cls, self.attr = cls, attr
        self.spec = (names, defaults, factories, frozen)

    def __get__(self, obj, owner=None):
        import dataclasses
        names, defaults, factories, frozen = self.spec
        annotations = self.cls.__dict__.get("__annotations__", {})
        columns = []
        for name in names:
            if name in factories:
                columns.append((name, annotations[name], dataclasses.field(default_factory=factories[name])))
            elif name in defaults:
                columns.append((name, annotations[name], dataclasses.field(default=defaults[name])))
            else:
                columns.append((name, annotations[name]))
        twin = dataclasses.make_dataclass(self.cls.__name__, columns, frozen=frozen)
        for attr in ("__dataclass_fields__", "__dataclass_params__"):
            setattr(self.cls, attr, getattr(twin, attr))
        return getattr(self.cls, self.attr)
