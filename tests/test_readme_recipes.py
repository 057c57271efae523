"""Every YAML recipe the README shows is a valid recipe, as a user would copy it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qcal_export.spec.recipe import recipe_from_dict

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_shows_recipes():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_recipe_loads(index):
    data = yaml.safe_load(BLOCKS[index])
    recipe = recipe_from_dict(data)
    assert recipe_from_dict(recipe.to_dict()) == recipe
    if "overrides" in data:
        assert len(recipe.overrides) == len(data["overrides"])
