"""The documented autograd Functions (SPEC.md §1): rope, fp32_linear, loss, norm."""
