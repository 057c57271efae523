"""Recipes: recipe_from_dict and load_recipe (YAML and JSON files) build the typed Recipe of
TensorSpecs and Overrides; bad keys, values and files raise RecipeError naming where they are.
"""

from __future__ import annotations

import json

import pytest

from qcal_export.errors import RecipeError
from qcal_export.spec.recipe import Override, Recipe, TensorSpec, load_recipe, recipe_from_dict

RECIPE_DATA = {
    "activation": {"format": "fp8", "method": "mse", "options": {"start": 0.5, "step": 0.25}},
    "weight": {"format": "int8", "per_channel": True},
    "op_types": ["MatMul", "Gemm"],
    "exclude_nodes": ["head/*"],
    "overrides": [
        {"nodes": "enc/*", "activation": None, "weight": {"format": "uint8"}},
        {"op_types": ["Gemm"], "activation": {"format": "int8"}},
    ],
    "weights_mode": "qdq",
}
RECIPE = Recipe(
    activation=TensorSpec("fp8", "mse", options={"start": 0.5, "step": 0.25}),
    weight=TensorSpec("int8", per_channel=True),
    op_types=("MatMul", "Gemm"),
    exclude_nodes=("head/*",),
    overrides=(
        Override(nodes="enc/*", weight=TensorSpec("uint8")),
        Override(op_types=("Gemm",), activation=TensorSpec("int8")),
    ),
    weights_mode="qdq",
)


def test_recipe_from_dict_builds_the_typed_recipe():
    recipe = recipe_from_dict(RECIPE_DATA)
    assert recipe == RECIPE
    assert recipe_from_dict({}) == Recipe()
    assert recipe.specs_for("enc/mm0", "MatMul") == (None, TensorSpec("uint8"))
    assert recipe.specs_for("dec/gemm", "Gemm") == (TensorSpec("int8"), None)
    assert recipe.specs_for("dec/mm", "MatMul") == (RECIPE.activation, RECIPE.weight)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_load_recipe_from_yaml_and_json(tmp_path, suffix):
    import yaml

    path = tmp_path / f"recipe{suffix}"
    text = json.dumps(RECIPE_DATA) if suffix == ".json" else yaml.safe_dump(RECIPE_DATA)
    path.write_text(text)
    assert load_recipe(path) == RECIPE
    assert load_recipe(str(path)) == RECIPE


def test_empty_yaml_recipe_is_the_default(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_recipe(path) == Recipe()


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"activations": {}}, ["activations"]),
        ({"activation": {"fromat": "int8"}}, ["activation", "fromat"]),
        ({"weight": {"format": "int8", "axis": 1}}, ["weight", "axis"]),
        ({"overrides": [{}, {"node": "enc/*"}]}, ["overrides[1]", "node"]),
        ({"overrides": [{"activation": {"bits": 8}}]}, ["overrides[0].activation", "bits"]),
        ({"activation": {"format": "int4"}}, ["int4", "weight format"]),
        ({"activation": {"format": "int3"}}, ["int3"]),
        ({"weight": {"format": "nvfp4", "block_size": 32}}, ["nvfp4", "16"]),
        ({"weight": {"format": "int8", "method": "nvfp4-mse"}}, ["nvfp4-mse", "int8"]),
        ({"activation": {"format": "nvfp4", "method": "nvfp4-mse"}}, ["nvfp4-mse", "activations"]),
        ({"weight": {"format": "int4", "block_size": 1}}, ["block_size"]),
        ({"nvfp4_form": "trt"}, ["nvfp4_form", "trt"]),
        ({"weight": {"format": "fp8", "method": "kl-divergence"}}, ["kl-divergence"]),
        ({"activation": {"method": "max", "options": {"start": 0.5}}}, ["'max'", "start"]),
        ({"weight": {"method": "mse", "options": {"stride": 0.5}}}, ["'mse'", "stride"]),
        ({"weights_mode": "fake"}, ["weights_mode", "fake"]),
        ({"nonfinite": "ignore"}, ["nonfinite", "ignore"]),
        ({"activation": "int8"}, ["activation", "mapping"]),
        ({"overrides": ["enc/*"]}, ["overrides[0]", "mapping"]),
        ({"activation": {"format": ["int8"]}}, ["activation", "unknown format ['int8']"]),
        ({"weight": {"method": 5}}, ["weight", "unknown method 5"]),
        ({"activation": {"options": 5}}, ["activation", "options must be a mapping", "5"]),
        ({"weight": {"method": "mse", "options": [0.5]}}, ["weight", "options must be a mapping"]),
        ({"weight": {"per_channel": "no"}}, ["weight", "per_channel must be true or false", "no"]),
        ({"weight": {"per_channel": 1}}, ["weight", "per_channel"]),
        ({"weight": {"format": "int4", "block_size": "x"}}, ["weight", "block_size", "'x'"]),
        ({"weight": {"format": "int4", "block_size": True}}, ["weight", "block_size", "True"]),
        ({"weight": {"format": "int4", "block_size": 64.0}}, ["block_size", "64.0"]),
        ({"weight": {"format": "int4", "block_size": 4097}}, ["block_size", "<= 4096", "4097"]),
        ({"op_types": 5}, ["op_types must be a list of strings", "5"]),
        ({"exclude_nodes": [1]}, ["exclude_nodes", "[1]"]),
        ({"modules": None}, ["modules", "None"]),
        ({"overrides": 5}, ["overrides must be a list", "5"]),
        ({"overrides": {"nodes": "enc/*"}}, ["overrides must be a list"]),
        ({"overrides": [{"nodes": 5}]}, ["overrides[0]", "nodes", "5"]),
        ({"overrides": [{"op_types": "Gemm"}]}, ["overrides[0].op_types", "Gemm"]),
        ({"weights_mode": 5}, ["weights_mode", "5"]),
        ({"nonfinite": [1]}, ["nonfinite", "[1]"]),
        ({"activation": {"method": "mse", "options": {"start": "x"}}}, ["activation", "start='x'"]),
        ({"weight": {"method": "percentile", "options": {"bins": 1e10}}}, ["weight", "bins"]),
        ({"1": {"format": "int8"}}, ["unknown key(s) ['1']"]),
    ],
)
def test_bad_recipe_raises_naming_the_key(tmp_path, data, names):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(data)
    for name in names:
        assert name in str(e.value)

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path) in str(e.value)
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"overrides": [{}, {"weight": {"format": "int3"}}]}, "overrides[1].weight"),
        ({"overrides": [{"activation": {"method": "kl-divergence"}}]}, "overrides[0].activation"),
        ({"weight": {"method": "max", "options": {"step": 0.1}}}, "weight"),
    ],
)
def test_bad_value_in_recipe_names_where_it_is(data, where):
    """Exposes a bug: recipe.py ``_spec`` calls ``TensorSpec(**...)`` without adding ``where``.

    A bad format, method or option inside a spec raises "unknown format 'int3'" with no hint of
    which of the recipe's specs holds it, while an unknown key does name its place
    (``overrides[1].weight: unknown key(s) ...``).
    """
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(data)
    assert where in str(e.value)


def test_bad_recipe_file_raises_naming_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RecipeError, match=r"missing\.yaml"):
        load_recipe(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("activation: {format: int8\nweight: [")
    with pytest.raises(RecipeError) as e:
        load_recipe(broken)
    assert str(broken) in str(e.value)
    not_json = tmp_path / "r.json"
    not_json.write_text("activation: {format: int8}")  # YAML in a .json file
    with pytest.raises(RecipeError) as e:
        load_recipe(not_json)
    assert str(not_json) in str(e.value)
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- activation\n- weight\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(top_list)
    assert str(top_list) in str(e.value) and "mapping" in str(e.value)


def test_unreadable_recipe_files_are_recipe_errors(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("weight: {format: int8}  # réglage\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1\.yaml is not UTF-8 .* at byte 27\)$"):
        load_recipe(latin1)
    with pytest.raises(RecipeError, match=r"recipe file .* is not a regular file$"):
        load_recipe(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RecipeError, match=r"deep\.json is not valid YAML/JSON"):
        load_recipe(deep)
    scalar = tmp_path / "zero.yaml"
    scalar.write_text("0\n")  # not the empty file's default recipe
    with pytest.raises(RecipeError, match=r"zero\.yaml: recipe must be a mapping, not int"):
        load_recipe(scalar)
    mixed_keys = tmp_path / "keys.yaml"
    mixed_keys.write_text("1: a\nweights: b\n")
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['1', 'weights'\]"):
        load_recipe(mixed_keys)


def test_recipes_built_in_python_are_checked_as_files_are():
    with pytest.raises(RecipeError, match=r"op_types must be a list of strings, not 'MatMul'"):
        Recipe(op_types="MatMul")
    with pytest.raises(RecipeError, match=r"activation must be a TensorSpec or None, not 'int8'"):
        Recipe(activation="int8")
    with pytest.raises(RecipeError, match=r"overrides must be a list of overrides"):
        Recipe(overrides=({"nodes": "*"},))
    with pytest.raises(RecipeError, match=r"override nodes must be a name pattern"):
        Override(nodes=None)
    with pytest.raises(RecipeError, match=r"option start=nan is out of range"):
        TensorSpec(method="mse", options={"start": float("nan")})
    lists = Recipe(op_types=["MatMul"], overrides=[Override(op_types=["Gemm"])])
    assert lists == Recipe(op_types=("MatMul",), overrides=(Override(op_types=("Gemm",)),))


@pytest.mark.parametrize("key", ["exclude_nodes", "op_types", "exclude_op_types"])
def test_recipe_string_for_a_list_field_is_not_split_into_characters(key):
    """Exposes a bug: recipe.py recipe_from_dict turns a string into ``tuple(string)``.

    ``exclude_nodes: "enc/*"`` (a natural YAML slip) becomes ``('e', 'n', 'c', '/', '*')``, and
    the one-character pattern ``'*'`` then excludes every node; ``op_types: MatMul`` becomes
    ``('M', 'a', ...)`` and selects nothing. Either reject it or read it as one pattern.
    """
    value = {"exclude_nodes": "enc/*", "op_types": "MatMul", "exclude_op_types": "Gemm"}[key]
    try:
        recipe = recipe_from_dict({key: value})
    except RecipeError as e:
        assert key in str(e)
        return
    assert getattr(recipe, key) == (value,)
