from glmserve.model.registry import get_model_class

__all__ = ["get_model_class"]
