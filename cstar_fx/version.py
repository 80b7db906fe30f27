"""The package version, in a module of its own so that any module can read it without importing the package.

Example:
    >>> import cstar_fx
    >>> __version__ == cstar_fx.__version__
    True
"""

__version__ = "0.1.0"
