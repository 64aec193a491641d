"""Plain-PyTorch references of every linghe op (SPEC.md), computed in float64/float32.

Tests compare the kernels against these; users may call them to check a result.
Each op family lives in its own module; this package re-exports them all.
"""
from .quant import (FP8, FP8_MAX, BLK, round_pow2_up, block_scale, quant_rows, quant_cols,  # noqa: F401
                    dequant_rows, dequant_cols)
from .norm import ref_rms_norm_and_block_quant_forward  # noqa: F401
from .loss import ref_cross_entropy, ref_cross_entropy_grad  # noqa: F401
from .norm_gate import ref_group_norm_gate, ref_group_norm_gate_backward  # noqa: F401
from .reduce import ref_batch_count_zero, ref_batch_sum_with_ord  # noqa: F401
from .silu import ref_batch_silu_bwd, ref_batch_silu_fwd, ref_silu_bwd, ref_silu_fwd  # noqa: F401
from .rope import ref_qk_norm_half_rope, ref_qk_norm_half_rope_backward  # noqa: F401
from .gemm import ref_fp32_gemm_backward, ref_fp32_gemm_forward, split_bf16  # noqa: F401
from .permute import make_row_id_map, ref_permute, ref_unpermute  # noqa: F401
