"""Adapters that drive the reuse_core engines from hosts other than ComfyUI.

``diffusers_attention``: Attention Map Reuse through diffusers attention processors.
``diffusers_encoder``: Encoder Feature Propagation on diffusers' ``UNet2DConditionModel``.
Both import diffusers lazily (only when an adapter is built), so ``reuse_core`` never needs it.
"""
