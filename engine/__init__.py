"""The batched fast path of `model.predictor.SesamePredictor`: prefix-shared KV cache, packed layers, kernels."""
from .batched import BatchedInference
from .build import build_predictor
from .config import EngineConfig
from .plan import batch_images
from .timing import StageTimer

__all__ = ["BatchedInference", "EngineConfig", "StageTimer", "batch_images", "build_predictor"]
