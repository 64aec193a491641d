"""Alias: this module is :mod:`linghe.utils.norm` itself."""
import sys

from linghe.utils import norm as _module

sys.modules[__name__] = _module
