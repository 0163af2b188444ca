"""The suite runs whatever the checkout's folder is called (issue 17).

The repository root holds ComfyUI's entry point, ``__init__.py``; pytest once imported it as a lone module in a clone
named ``comfyui-reuse`` (not a Python name) and every test errored, while the suite passed in folders with other
names. ``tests/conftest.py`` has pytest collect the root as a plain folder; ``.ci/run`` runs the whole suite from a
checkout named ``comfyui-reuse``. This test keeps the quick inner loop honest in any other folder: a stand-in
checkout of that name (links to this one's files) runs one test.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]


def test_suite_runs_from_a_folder_named_comfyui_reuse(tmp_path):
    checkout = tmp_path / "comfyui-reuse"
    (checkout / "tests").mkdir(parents=True)
    for entry in REPO_DIR.iterdir():
        if entry.name not in {".git", ".venvs", "tests"}:
            (checkout / entry.name).symlink_to(entry)
    for entry in (REPO_DIR / "tests").iterdir():
        (checkout / "tests" / entry.name).symlink_to(entry)
    (checkout / "tests" / "test_in_checkout.py").write_text("def test_runs():\n    pass\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_in_checkout.py"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
