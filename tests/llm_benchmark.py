"""The benchmarks' LLM-shaped model builder (``benchmarks/llm_model.py``, not a package), loaded
for the tests that build its tiny size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_model.py"


def load_llm_model() -> ModuleType:
    """``benchmarks/llm_model.py`` as the module ``llm_model`` (one instance per session)."""
    spec = importlib.util.spec_from_file_location("llm_model", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("llm_model", module)
    spec.loader.exec_module(module)
    return module
