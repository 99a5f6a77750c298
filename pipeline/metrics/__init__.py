"""Evaluation metrics; importing this package registers every metric module found beside it (base.register)."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
