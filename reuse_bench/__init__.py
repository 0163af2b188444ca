"""reuse_bench: the main job and benchmark (``python -m reuse_bench``).

A class-conditional diffusers U-Net trained on real MNIST digits ships with the repo (``builtin_model``);
the bench samples it with and without every method (``bench``, ``methods``) and writes a table, JSON, an
image grid and a PSNR-vs-speed plot (``report``). ``--comfyui PATH`` times the methods in real ComfyUI.
Unlike ``reuse_core`` this package may import diffusers; it imports ComfyUI only in ``--comfyui`` mode.
"""
