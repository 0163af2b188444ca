"""Import-only stand-in; see ``torchvision/__init__.py``."""

from torchvision import _Unavailable


def __getattr__(attr):
    return _Unavailable(f"transforms.functional.{attr}")
