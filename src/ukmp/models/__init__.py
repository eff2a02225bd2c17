"""Model adapters (architecture knowledge) and builders: :func:`adapter_for` picks one from a model's config.

The names below are imported on first use, so that the torch-free parts (``ukmp.models.families``: what each family
can be evaluated on, read by config validation) load without torch.
"""

from importlib import import_module

_FROM = {
    "BatchLayout": "base", "FeatureBlock": "base", "ModelAdapter": "base", "RemovedSlice": "base",
    "RemovedWeights": "base", "count_parameters": "base",
    "MODELS": "registry", "adapter_for": "registry", "forward_batch": "registry", "forward_inputs": "registry",
    "is_decoder_only": "registry", "register_language_model": "registry", "register_model": "registry",
}
__all__ = ["BatchLayout", "MODELS", "FeatureBlock", "ModelAdapter", "RemovedSlice", "RemovedWeights", "adapter_for",
           "count_parameters", "forward_batch", "forward_inputs", "is_decoder_only", "register_language_model",
           "register_model"]


def __getattr__(name: str):
    if name in _FROM:
        value = getattr(import_module(f"ukmp.models.{_FROM[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ukmp.models' has no attribute {name!r}")
