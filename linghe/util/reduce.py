"""Alias: this module is :mod:`linghe.utils.reduce` itself."""
import sys

from linghe.utils import reduce as _module

sys.modules[__name__] = _module
