"""Model adapters (architecture knowledge) and builders: :func:`adapter_for` picks one from a model's config."""

from ukmp.models.base import BatchLayout, FeatureBlock, ModelAdapter, RemovedSlice, RemovedWeights, count_parameters
from ukmp.models.registry import (MODELS, adapter_for, forward_batch, forward_inputs, is_decoder_only,
                                  register_language_model, register_model)

__all__ = ["BatchLayout", "MODELS", "FeatureBlock", "ModelAdapter", "RemovedSlice", "RemovedWeights", "adapter_for",
           "count_parameters", "forward_batch", "forward_inputs", "is_decoder_only", "register_language_model",
           "register_model"]
