"""Import-only stand-ins for torchvision and torchaudio, put on ``sys.path`` only when the real one cannot load.

PyPI's torchvision and torchaudio cannot load beside the CPU torch build that the tests and the bench pin
(``operator torchvision::nms does not exist``), yet ComfyUI imports both at module level for models this pack never
touches (Cosmos, Stable Cascade, SAM3, BiRefNet, audio models, ...). Every submodule (``torchvision.ops``,
``torchaudio.functional``, ...) imports; any actual use raises, so nothing can pass by silently running through a
stand-in.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class Unavailable:
    def __init__(self, name):
        self._name = name

    def _fail(self, what):
        raise RuntimeError(
            f"{what} is not available: comfyui-reuse's test/bench harness replaced it with an import-only "
            "stand-in (reuse_bench/comfyui_standins), because the real package cannot load beside this torch build."
        )

    def __getattr__(self, attr):
        if attr.startswith("__"):  # keep hasattr/copy/inspect probes working
            raise AttributeError(attr)
        return Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        self._fail(self._name)

    def __mro_entries__(self, bases):  # ``class X(torchaudio.transforms.Y)`` defines; using X raises
        name = self._name

        class _Base:
            def __init__(self, *args, **kwargs):
                Unavailable(name)._fail(name)

        return (_Base,)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        make_standin(module)


def make_standin(module: types.ModuleType) -> None:
    """Turn ``module`` (a package) into a stand-in whose attributes and submodules all import."""

    def missing(attr):
        if attr.startswith("__"):  # module probes (__file__, __version__, ...) by other libraries stay plain
            raise AttributeError(attr)
        return Unavailable(f"{module.__name__}.{attr}")

    module.__path__ = []
    module.__file__ = __file__  # tools that walk sys.modules (inspect, linecache, diffusers) expect a path
    module.__getattr__ = missing
    root = module.__name__.split(".")[0]
    if module.__name__ == root and not any(isinstance(f, _Finder) and f.root == root for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(root))
