"""reduce: reduced models of transformer units.

Record hook activations, run ablations, fit sparse GLM reduced models of a target unit from
grouped upstream features, and validate them counterfactually. The public API is importable
from here; modules load on first use, so ``import reduce`` stays fast.
"""

from importlib import import_module

_EXPORTS = {
    "ReduceError": "errors",
    "Condition": "condition",
    "load_condition": "condition",
    "resolve": "condition",
    "PromptSet": "prompts",
    "build_prompts": "prompts",
    "RunningStats": "stats",
    "record": "record",
    "inspect_unit": "inspect",
    "rank_selectivity": "inspect",
    "load_model": "models",
    "Site": "sites",
    "Target": "target",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reduce' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
