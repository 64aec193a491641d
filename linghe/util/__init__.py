"""Alias of :mod:`linghe.utils` under the spelling the API reference also uses.

``linghe.util.<m>`` is the very same module object as ``linghe.utils.<m>`` for
norm, gather, scatter, silu and reduce.
"""
