"""Lowerings of the block-mask IR, one package per device family; see sparsecore.registry."""
