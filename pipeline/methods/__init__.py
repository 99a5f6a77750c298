"""Distillation methods; importing this package registers every method module found beside it.

base.py (the interface), common.py (shared pieces) and discriminator.py are infrastructure, not methods."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
