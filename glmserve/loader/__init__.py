from glmserve.loader.loader import LoaderError, load_model

__all__ = ["LoaderError", "load_model"]
