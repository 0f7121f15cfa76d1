"""The ``fgo`` command line. Nothing in the package imports it."""

from .main import main as main
