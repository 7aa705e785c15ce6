"""Front ends: the attention APIs people already use, as thin adapters over `flexattn.flex_attention`.

* `flexattn.frontends.xformers`  - ``memory_efficient_attention`` and the ``attn_bias`` classes;
* `flexattn.frontends.mindspore` - ``flash_attention_score`` (layouts BSH/BNSD/SBH/BSND/TND, sparse modes);
* `flexattn.nn.FlashAttention`   - the FlashAttention ``nn.Module`` of lucidrains-style models.

Each turns its arguments into mask_mods / score_mods / BlockMasks and calls the same
compiler: there is no second set of kernels.
"""
