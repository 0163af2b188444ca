import pytest
import torch
from comfy_harness import comfyui_unavailable_reason, require_comfyui


class RepositoryRootIsNotATestPackage:
    """Collect the repository root as a plain folder, never as a Python package.

    The root's ``__init__.py`` is ComfyUI's entry point to the pack, so pytest would collect the root as a package
    and import that ``__init__.py`` (to look for ``setup_module``) under the root folder's name: in a clone named
    ``comfyui-reuse`` (not a Python name) it imports it as a lone module, whose relative imports fail, and every
    test errors (issue 17); under a valid name it imports the pack as a package named after the folder and puts
    the folder above it (``custom_nodes/``, with every other pack) on ``sys.path``. The tests import the pack
    themselves, as ``comfyui_reuse`` (``reuse_bench/comfyui_env.py``). A conftest's own hooks apply only below its
    folder, so this is a plugin, registered below.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        conftest = path / "tests" / "conftest.py"  # this file: the folder is the repository root
        if conftest.is_file() and conftest.samefile(__file__):
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(RepositoryRootIsNotATestPackage(), "comfyui-reuse-root-is-not-a-test-package")


# Tests that need these fixtures need real ComfyUI: they get the ``comfyui`` marker without saying so, so that
# ``pytest -m "not comfyui"`` is the quick inner loop.
COMFYUI_FIXTURES = {"comfy", "comfy_server", "object_info", "page"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMFYUI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(scope="session")
def comfy():
    """Real ComfyUI imported in CPU mode; skips with the reason when it is absent (fails under CI)."""
    require_comfyui(comfyui_unavailable_reason())
    from comfy_harness import import_comfy

    return import_comfy()


@pytest.fixture
def runs(comfy):
    """A ``run_records.RunRecorder`` active for the test: what every run of either node did, from its stats."""
    from run_records import RunRecorder

    with RunRecorder() as recorder:
        yield recorder


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Every test starts on one torch thread, even after a test ran ``reuse_bench.main`` (which sets its own).

    The test models are tiny: one thread is faster than two (OpenMP barriers dominate, badly so on a busy 2-core
    CI machine), and it keeps results independent of the machine's thread count.
    """
    torch.set_num_threads(1)
