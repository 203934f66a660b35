"""MoDSE mixture-of-experts on megatron-core: variable-width experts, placement, layer, specs.

Importing a submodule imports megatron-core (and so activates the CPU layer on CPU machines):
``from modse_megatron.moe.specs import get_modse_decoder_block_spec``.
"""
