"""linghe: fused GPU kernels for LLM training, compiled just in time with NVRTC.

Import the documented entry points from their modules (``linghe.utils.norm``,
``linghe.facade.loss``, ...); kernels compile on first use and are cached on disk.
"""
__version__ = "0.1.0"
