"""The documented functional entry points (SPEC.md §1): norm, gather, scatter, silu, reduce."""
