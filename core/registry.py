"""Registries: one kind of thing each (datasets, triggers, attacks, defenses, backbones), name -> class.

A registry is the single source of truth for what exists and what is known about it. Entries come from
scanning a package (one class per file, named by the file: how defenses, triggers and attacks are added) or
from `register` (backbones, datasets, and anything defined outside the package, such as a test's own backbone).
Metadata lives on the class itself (a defense's `family` and `display_name`, an attack's `dynamic`, a backbone's
`layer_roles`), so registering a class is all it takes; `meta(name)` reads it.

    BACKBONES.register("tiny_resnet", TinyResNet)   # or @BACKBONES.register("tiny_resnet") above the class
    DEFENSES["ft"], DEFENSES.name_of(FT), DEFENSES.display("ftsam") == "FT-SAM"
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=type)


def class_path(obj: type | object) -> str:
    """The dotted import path of a class (or of an object's class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str, base: type, what: str) -> type:
    """The class a dotted path names, checked to be a subclass of `base`; a clear error otherwise."""
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"unknown {what} {path!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{what} {path!r} is not a {base.__name__} subclass")
    return cls


class Registry(Mapping[str, T], Generic[T]):
    """Name -> class for one kind; a read-only mapping plus `register`, `name_of`, `meta` and `display`.

    Args:
        kind: what the entries are, for messages ("defense", "backbone", ...).
        base: every entry is a subclass of it.
        meta_keys: class attributes reported by `meta` (with their defaults when a class lacks one).
    """

    def __init__(self, kind: str, base: type, meta_keys: Mapping[str, Any] | None = None) -> None:
        self.kind, self.base = kind, base
        self.meta_keys = dict(meta_keys or {})
        self._entries: dict[str, T] = {}

    # -- filling ------------------------------------------------------------------------------------------
    def register(self, name: str, cls: T | None = None) -> Any:
        """Add `cls` under `name` (or use as a decorator: `@REGISTRY.register("name")`)."""
        def add(c: T) -> T:
            if not (isinstance(c, type) and issubclass(c, self.base)):
                raise TypeError(f"{self.kind} {name!r}: {c!r} is not a {self.base.__name__} subclass")
            known = self._entries.get(name)
            if known is not None and known is not c and class_path(known) != class_path(c):
                raise ValueError(f"{self.kind} {name!r} is already registered as {class_path(known)}")
            self._entries[name] = c
            return c
        return add if cls is None else add(cls)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def discover(self, package: str, skip: set[str] = frozenset(), required: bool = True) -> None:
        """Register the one `base` subclass defined in each module of `package`, under the module's name.
        Modules named in `skip` or starting with "_" are helpers. `required`: a module without one is an error."""
        pkg = importlib.import_module(package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name in skip or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package}.{info.name}")
            classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                       if issubclass(c, self.base) and c is not self.base and c.__module__ == module.__name__
                       and not inspect.isabstract(c)]
            if len(classes) == 1:
                self.register(info.name, classes[0])
            elif classes or required:
                raise ImportError(f"{module.__name__} must define exactly one {self.base.__name__} subclass "
                                  f"(the {self.kind} named {info.name!r}), found {classes}")

    # -- reading ------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}") from None

    def get_class(self, name: str) -> T:
        """Like `REGISTRY[name]`, but a ValueError (for argument checks and CLI messages)."""
        try:
            return self[name]
        except KeyError as err:
            raise ValueError(err.args[0]) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"

    def name_of(self, cls_or_name: type | str) -> str:
        """The registry name of a class, its class name, or its class path ('FT', 'SmallCNN', 'a.b.FT')."""
        for name, cls in self._entries.items():
            if cls_or_name is cls or cls_or_name in (name, cls.__name__, class_path(cls)):
                return name
        raise KeyError(f"{cls_or_name!r} is not a registered {self.kind}; registered: {', '.join(self._entries)}")

    def meta(self, name: str) -> dict[str, Any]:
        cls = self[name]
        return {key: getattr(cls, key, default) for key, default in self.meta_keys.items()}

    def display(self, name: str) -> str:
        """The name tables and figures use: the class's `display_name`, else its class name."""
        cls = self[self.name_of(name)]
        return getattr(cls, "display_name", None) or cls.__name__

    def where(self, predicate: Callable[[T], bool]) -> list[str]:
        """Names of the entries whose class satisfies `predicate` (e.g. every pruning defense)."""
        return [name for name, cls in self._entries.items() if predicate(cls)]
