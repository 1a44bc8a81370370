"""The package as users get it: one version, typed, licensed, every public name documented."""

import inspect
import re
from pathlib import Path

import neuralode

ROOT = Path(__file__).resolve().parent.parent


def test_version_comes_from_the_project_metadata():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (declared,) = re.findall(r'^version = "([^"]+)"$', pyproject, flags=re.M)
    assert neuralode.__version__ == declared


def test_typed_marker_and_license_ship_with_the_package():
    assert (Path(neuralode.__file__).parent / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^neuralode = \["py.typed"\]$', pyproject, flags=re.M)  # package-data
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert re.search(r'^license = "MIT"$', pyproject, flags=re.M)


def test_every_public_name_has_a_docstring_and_a_place_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: neuralode\.(\w+)$", api, flags=re.M))
    assert documented == set(neuralode.__all__)
    for name in neuralode.__all__:
        obj = getattr(neuralode, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"neuralode.{name} has no docstring"
