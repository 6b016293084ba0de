"""The demo: small real models and offline data sets, and ``coar demo`` itself.

None of this is needed to use coarpy on your own model; it is what the demo, the
examples, the test suite and the benchmarks run on, so that all of them use real data
without a download.

- :mod:`coarpy.demo.data`: scikit-learn's digits, Fashion-MNIST, the Pang-Lee
  sentences and the all-MiniLM-L6-v2 encoder, read offline.
- :mod:`coarpy.demo.models`: the BatchNorm CNNs (``DigitsCNN``, ``FashionCNN``,
  ``small_digits_cnn``).
- :mod:`coarpy.demo.train`: training, accuracy and cached pretrained CNNs.
- :mod:`coarpy.demo.probe`: sentence probes on a frozen encoder.
- :mod:`coarpy.demo.run`: ``run_demo`` (``coar demo``) and ``digits_setup``, the run
  configuration factory ``factory = "coarpy.demo:digits_setup"``.
"""

from .data import digits, fashion_mnist, minilm, pang_lee_sentences
from .models import DigitsCNN, FashionCNN, small_digits_cnn
from .probe import SentenceProbe, minilm_sentiment, sentiment_probe
from .run import digits_setup, run_demo
from .train import accuracy, pretrained_digits_cnn, pretrained_fashion_cnn, train_classifier

__all__ = [
    "DigitsCNN",
    "FashionCNN",
    "SentenceProbe",
    "accuracy",
    "digits",
    "digits_setup",
    "fashion_mnist",
    "minilm",
    "minilm_sentiment",
    "pang_lee_sentences",
    "pretrained_digits_cnn",
    "pretrained_fashion_cnn",
    "run_demo",
    "sentiment_probe",
    "small_digits_cnn",
    "train_classifier",
]
