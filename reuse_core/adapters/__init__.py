"""Adapters that drive the reuse_core engines from hosts other than ComfyUI.

``diffusers_attention``: Attention Map Reuse through diffusers attention processors (U-Net and Flux layers).
``diffusers_encoder``: Encoder Feature Propagation on diffusers' ``UNet2DConditionModel``.
``diffusers_transformer``: Encoder Feature Propagation on diffusers' ``FluxTransformer2DModel``.
All import diffusers lazily (only when an adapter is built), so ``reuse_core`` never needs it.
"""
