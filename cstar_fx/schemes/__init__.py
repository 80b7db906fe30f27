"""The factorized forms of a layer, registered by name (see :mod:`cstar_fx.schemes.base`).

Importing this package registers the built-in schemes; a new scheme is one module here, imported below.

Example:
    >>> import cstar_fx.schemes as schemes
    >>> schemes.names()
    ('dense', 'svd', 'tucker2', 'spatial_svd')
"""

# Each module registers its scheme on import; the order is the registry's (and conv_scheme_names') order.
from . import dense, svd, tucker2  # noqa: F401  isort: skip
from . import spatial_svd  # noqa: F401  isort: skip
from .base import (AUTO, DEFAULT_CONV, DENSE, Factors, LayerSpec, Op, Scheme, candidates, conv_scheme_names,
                   factor_path, get, layer_spectra, names, register)

__all__ = ["Scheme", "Factors", "LayerSpec", "Op", "register", "get", "names", "conv_scheme_names", "candidates",
           "layer_spectra", "factor_path", "DENSE", "AUTO", "DEFAULT_CONV"]
