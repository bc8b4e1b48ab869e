"""Sparsity methods: planners that emit BlockMask IRs (none imports a device library)."""
