from glmserve.loader.dummy import fill_dummy_weights
from glmserve.loader.heap import keep_freed_heap_for_steps, release_freed_heap
from glmserve.loader.loader import LoaderError, load_model

__all__ = ["LoaderError", "fill_dummy_weights", "keep_freed_heap_for_steps", "load_model", "release_freed_heap"]
