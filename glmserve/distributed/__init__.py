from glmserve.distributed.parallel import ParallelContext, init_parallel

__all__ = ["ParallelContext", "init_parallel"]
