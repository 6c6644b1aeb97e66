"""hiertcn_fast: fused causal-convolution and GRU kernels and the HierTCN next-item recommender.

The compiled extension is optional at import: ``hiertcn_fast.backends()`` says what is usable here.
"""

from . import _extension  # noqa: F401  (guarded load of hiertcn_fast._C, registers the C++ ops)
from . import nn, ops
from .backends import BackendStatus, BackendUnavailableError, backends, use_backend

__version__ = "0.1.0"

__all__ = ["BackendStatus", "BackendUnavailableError", "backends", "nn", "ops", "use_backend", "__version__"]
