"""Model adapters (architecture knowledge) and builders."""

from ukmp.models.blip2 import Blip2T5Adapter

ADAPTERS = {Blip2T5Adapter.name: Blip2T5Adapter}


def adapter_for(model_or_config):
    """The adapter that understands ``model_or_config`` (only BLIP-2 with a T5 language model so far)."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) != "blip-2":
        raise ValueError(f"model: unsupported model_type {getattr(config, 'model_type', None)!r} (expected 'blip-2')")
    return Blip2T5Adapter(config)


__all__ = ["ADAPTERS", "Blip2T5Adapter", "adapter_for"]
