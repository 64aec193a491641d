"""Alias: this module is :mod:`linghe.utils.scatter` itself."""
import sys

from linghe.utils import scatter as _module

sys.modules[__name__] = _module
