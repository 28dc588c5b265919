from glmserve.loader.dummy import fill_dummy_weights
from glmserve.loader.loader import LoaderError, load_model

__all__ = ["LoaderError", "fill_dummy_weights", "load_model"]
