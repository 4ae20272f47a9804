"""Models with declared width groups, buildable at any width.

* :mod:`.vision`: ``FashionCNN`` and HeteroFL's ``PreResNet18``;
* :mod:`.language`: our decoder-only ``TransformerLM`` and ``transformers``' GPT-2;
* :mod:`.layers`: HeteroFL's Scaler;
* :mod:`.registry`: the names run configs use, ``build_model`` and the run's model factory;
* :mod:`.evaluation`: cross-entropy per target and the global model's evaluation.
"""

from .language import GPT2LM, TransformerLM
from .layers import Scaler
from .registry import MODELS, OUTPUT_SCALINGS, ModelSettings, build_model, model_class, model_factory
from .vision import FashionCNN, ImageClassifier, PreResNet18

__all__ = [
    "GPT2LM", "MODELS", "OUTPUT_SCALINGS", "FashionCNN", "ImageClassifier", "ModelSettings", "PreResNet18", "Scaler",
    "TransformerLM", "build_model", "model_class", "model_factory",
]  # fmt: skip
