"""The type information: the installed package carries it (PEP 561), and the typed use of the API that
``.ci/types`` checks with mypy (tests/typed_usage.py) runs."""
import importlib.resources

import typed_usage
from bn_helpers import require_torch


def test_package_is_typed():
    files = importlib.resources.files("cbn")
    assert files.joinpath("py.typed").is_file() and files.joinpath("_roofline.pyi").is_file()


def test_typed_usage_runs():
    typed_usage.main()


def test_typed_usage_of_torch_runs():
    require_torch()
    typed_usage.torch_adapter()
