"""Import-time stand-in for torchvision, used only by the ComfyUI test harness.

ComfyUI v0.3.64 imports torchvision at module level for Cosmos, Stable Cascade and ACE,
none of which this pack patches or tests. PyPI's torchvision cannot load beside the CPU
torch build that CI pins (``operator torchvision::nms does not exist``), so the harness
puts this package on ``sys.path`` only when the real one fails to import. Any actual use
raises, so a test can never pass by silently running through it.
"""


class _Unavailable:
    def __init__(self, name):
        self._name = name

    def _fail(self, what):
        raise RuntimeError(
            f"torchvision.{what} is not available: the comfyui-reuse test harness "
            "replaced torchvision with an import-only stand-in (see tests/comfy_shims)."
        )

    def __getattr__(self, attr):
        if attr.startswith("__"):  # keep hasattr/copy/inspect probes working
            raise AttributeError(attr)
        self._fail(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        self._fail(self._name)


def __getattr__(attr):
    return _Unavailable(attr)
