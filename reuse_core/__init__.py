"""reuse_core: training-free reuse of work across diffusion sampling steps.

A standalone torch package (never imports ComfyUI): schedules and their search, the
attention-map cache and reuse math, the encoder-propagation engine, metrics, and thin
adapters for hosts other than ComfyUI.
"""

__version__ = "0.1.0"
