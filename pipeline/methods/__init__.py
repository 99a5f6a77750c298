"""Distillation methods and their registry; importing this package registers every method module beside it.

base.py (the interface), common.py (shared pieces) and discriminator.py are infrastructure, not methods.
A method declares its facts on its class (pipeline/methods/base.py: `name`, `description`, `Options`,
`ladder_rank`, `ladder_rows`); config validation, the CLI, the model card, the report tables and the
ablation ladder read them from here, so adding a method is one new module (and its docs/methods.md entry).
"""
import importlib
import pkgutil

from pipeline.methods.base import METHODS, Method

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def method_names() -> list[str]:
    """Every registered method's name, sorted."""
    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(method_names())})")
    return METHODS[name]


def ladder_methods() -> list[type[Method]]:
    """The methods on the ablation ladder (a `ladder_rank`), in ladder order."""
    return sorted((m for m in METHODS.values() if m.ladder_rank is not None), key=lambda m: (m.ladder_rank, m.name))


def ladder_rank(name: str) -> float:
    """A method's place on the ladder; methods off the ladder (or unknown) come after every ladder method."""
    method = METHODS.get(name)
    return method.ladder_rank if method is not None and method.ladder_rank is not None else float("inf")
