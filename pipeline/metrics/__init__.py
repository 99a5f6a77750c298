"""Evaluation metrics and their registry; importing this package registers every metric module beside it.

base.py holds the interface (Metric, EvalContext, Samples, `register`); the readers of the registry live here,
after the discovery, so no metric module imports a module that imports it back."""
import importlib
import pkgutil

from pipeline.errors import UserError
from pipeline.metrics.base import METRICS, Metric

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def registered() -> dict[str, type[Metric]]:
    """Every metric, in report order."""
    return dict(sorted(METRICS.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_metric(name: str) -> type[Metric]:
    known = registered()
    if name not in known:
        raise KeyError(f"unknown metric '{name}' (known: {', '.join(known)})")
    return known[name]


def metrics_for(cfg) -> list[type[Metric]]:
    """The metrics this run computes: `evaluate.metrics` if given (each must apply), else all that apply."""
    known = registered()
    chosen = getattr(cfg.evaluate, "metrics", None)
    if chosen is None:
        return [m for m in known.values() if m.applies(cfg)]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise UserError(f"evaluate.metrics: unknown metric '{unknown[0]}' (known: {', '.join(known)})")
    idle = [n for n in chosen if not known[n].applies(cfg)]
    if idle:
        raise UserError(f"evaluate.metrics: '{idle[0]}' does not apply to this run ({known[idle[0]].when})")
    return [m for n, m in known.items() if n in chosen]
