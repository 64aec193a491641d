"""Alias: this module is :mod:`linghe.utils.silu` itself."""
import sys

from linghe.utils import silu as _module

sys.modules[__name__] = _module
