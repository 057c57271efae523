"""``--data-module file.py:function``: the function's feeds, loaded from the file by path; every
failure (no file, no function, an exception while loading, calling or iterating) is one
DataError naming the file and the function."""

from __future__ import annotations

import pytest

from qcal_export.capture.data import feeds, model_inputs, open_data
from qcal_export.capture.data_module import DataModule
from qcal_export.errors import DataError, RecipeError

MODULE = """
import numpy as np
from calib_helper import SCALE  # a sibling module of the file imports

CALLS = []

def as_list():
    return [{"x": np.full((2, 3), SCALE * i, np.float32)} for i in range(3)]

def per_pass():
    CALLS.append(1)
    def make():
        return ({"x": np.full((2, 3), float(len(CALLS)), np.float32)} for _ in range(2))
    return make

def one_shot():
    return iter(as_list())

def raises():
    raise ValueError("no data here")

def breaks_at_one():
    yield {"x": np.zeros((2, 3), np.float32)}
    raise KeyError("labels")

NOT_A_FUNCTION = 3

from dataclasses import dataclass

@dataclass
class Sample:  # a dataclass needs its module in sys.modules
    x: float
"""


def module(tmp_path, function, text=MODULE):
    (tmp_path / "calib_helper.py").write_text("SCALE = 2.0\n")
    (tmp_path / "calib.py").write_text(text)
    return DataModule.parse(f"{tmp_path / 'calib.py'}:{function}")


def test_a_list_is_re_iterable_and_checked_against_the_inputs(tmp_path):
    from data_models import one_input_model

    data = open_data(module(tmp_path, "as_list"))
    for _ in range(2):
        batches = list(feeds(data, model_inputs(one_input_model())))
        assert [b["x"][0, 0] for b in batches] == [0.0, 2.0, 4.0]
    assert data.description.endswith("calib.py:as_list")


def test_a_returned_callable_makes_the_feeds_of_each_pass(tmp_path):
    data = open_data(module(tmp_path, "per_pass"))
    assert [b["x"][0, 0] for b in data.batches()] == [1.0, 1.0]
    assert len(list(data.batches())) == 2


def test_a_one_shot_iterator_fails_on_the_second_pass(tmp_path):
    data = open_data(module(tmp_path, "one_shot"))
    assert len(list(data.batches())) == 3
    with pytest.raises(DataError, match=r"calib.py:one_shot returned a one-shot iterator"):
        data.batches()


@pytest.mark.parametrize(
    ("function", "text", "message"),
    [
        ("raises", MODULE, r"data module .*calib.py:raises raised ValueError: no data here \(when"),
        ("missing", MODULE, r"data module .*calib.py has no function 'missing' \(--data-module"),
        ("NOT_A_FUNCTION", MODULE, r"has no function 'NOT_A_FUNCTION'"),
        ("f", "import nowhere_to_be_found\n", r"calib.py failed to load: ModuleNotFoundError"),
        ("f", "def f(:\n", r"calib.py failed to load: SyntaxError"),
        ("f", "import sys\nsys.exit(3)\n", r"calib.py failed to load: SystemExit: 3"),
        ("f", "def f():\n    return 3\n", r"calib.py:f returned a int: return an iterable"),
    ],
)
def test_failures_name_the_file_and_function(tmp_path, function, text, message):
    with pytest.raises(DataError, match=message):
        open_data(module(tmp_path, function, text))


def test_an_exception_while_iterating_names_the_batch(tmp_path):
    data = open_data(module(tmp_path, "breaks_at_one"))
    with pytest.raises(
        DataError, match=r"breaks_at_one raised KeyError: 'labels' \(making batch 1"
    ):
        list(data.batches())


def test_a_missing_file_and_a_malformed_name(tmp_path):
    with pytest.raises(
        DataError, match=r"data module .*nowhere.py \(--data-module .*:f\) does not"
    ):
        open_data(DataModule.parse(f"{tmp_path / 'nowhere.py'}:f"))
    for text in ("calib.py", "calib.py:", ":f", "calib.py:not-a-name"):
        with pytest.raises(RecipeError, match=r"is not FILE.py:FUNCTION"):
            DataModule.parse(text)
