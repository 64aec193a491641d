"""Alias: this module is :mod:`linghe.utils.gather` itself."""
import sys

from linghe.utils import gather as _module

sys.modules[__name__] = _module
