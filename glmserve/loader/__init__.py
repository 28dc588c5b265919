from glmserve.loader.dummy import fill_dummy_weights
from glmserve.loader.heap import release_freed_heap
from glmserve.loader.loader import LoaderError, load_model

__all__ = ["LoaderError", "fill_dummy_weights", "load_model", "release_freed_heap"]
