"""all-MiniLM-L6-v2 with a sentiment head on movie-review sentences (autoq_zoo.minilm_sentiment_task).

The head for the default ``n_train`` is cached under ``~/.cache/autoq`` (or ``$AUTOQ_CACHE``):
the first run embeds 4000 sentences (~50 s on 2 cores), later runs build the task in ~3 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

import autoq_zoo as zoo
from autoq_zoo import MiniLMClassifier, Task

N_VAL, N_TEST, CALIB_BATCHES = 300, 300, 4


@pytest.fixture(scope="module")
def task() -> Task:
    """Default head (4000 training sentences, cached), fewer val/test sentences to keep evaluation short."""
    rng_state = torch.get_rng_state()
    task = zoo.minilm_sentiment_task(seed=0, n_val=N_VAL, n_test=N_TEST, calib_batches=CALIB_BATCHES)
    assert torch.equal(torch.get_rng_state(), rng_state), "building must not consume the caller's RNG"
    return task


def test_movie_review_snippets_are_distinct_labeled_sentences() -> None:
    sentences, labels = zoo.movie_review_snippets()
    assert len(sentences) == len(set(sentences)) == len(labels) == 10_603
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1}
    assert int(labels.sum()) == 5241
    assert all(sentence.strip() and "\t" not in sentence and "\r" not in sentence for sentence in sentences)
    assert "Effective but too tepid biopic" in sentences  # third row of the file, rated -0.6
    assert labels[sentences.index("Effective but too tepid biopic")] == 0


def test_splits_are_disjoint_and_fixed_by_the_seed() -> None:
    parts = zoo.text._movie_review_splits(seed=0, n_val=1000, n_test=1000, n_train=4000, n_calib=256)
    sizes = {name: len(sentences) for name, (sentences, _) in parts.items()}
    assert sizes == {"val": 1000, "test": 1000, "train": 4000, "calib": 256}
    sets = {name: set(sentences) for name, (sentences, _) in parts.items()}
    assert sum(map(len, sets.values())) == len(set().union(*sets.values())) == 6256
    again = zoo.text._movie_review_splits(0, 1000, 1000, 4000, 256)
    for name, (sentences, labels) in parts.items():
        assert again[name][0] == sentences and torch.equal(again[name][1], labels)
    assert set(zoo.text._movie_review_splits(1, 1000, 1000, 4000, 256)["val"][0]) != sets["val"]
    # The cached head's training sentences depend on seed and n_train only; val on seed and n_val only.
    small = zoo.text._movie_review_splits(0, 100, 50, 4000, 8)
    assert small["train"][0] == parts["train"][0] and small["val"][0] == parts["val"][0][:100]


def test_impossible_counts_are_rejected_with_the_numbers() -> None:
    with pytest.raises(ValueError, match="10603 distinct sentences, fewer than the 12256 requested"):
        zoo.minilm_sentiment_task(n_train=10_000)
    with pytest.raises(ValueError, match="must all be positive"):
        zoo.minilm_sentiment_task(batch_size=0)


def test_inputs_are_padded_token_batches(task: Task) -> None:
    assert task.batch_size == 8 and task.preprocess is None
    assert len(task.calib) == CALIB_BATCHES
    for input_ids, attention_mask in [task.example_inputs, *task.calib]:
        assert input_ids.shape == attention_mask.shape == (8, 64)
        assert input_ids.dtype == attention_mask.dtype == torch.int64
        assert set(attention_mask.unique().tolist()) <= {0, 1}
        assert bool((input_ids[:, 0] == 101).all())  # [CLS]
        assert bool((input_ids[attention_mask == 0] == 0).all())  # [PAD] past the attended tokens
    assert all(torch.equal(a, b) for a, b in zip(task.example_inputs, task.calib[0]))
    for (input_ids, attention_mask), labels, count in (
        (task.val[0], task.val[1], N_VAL),
        (task.test[0], task.test[1], N_TEST),
    ):
        assert input_ids.shape == attention_mask.shape == (count, 64)
        assert labels.shape == (count,) and labels.dtype == torch.int64
    inputs, labels = next(task.batches("test"))
    assert isinstance(inputs, tuple) and [t.shape for t in inputs] == [(8, 64)] * 2 and labels.shape == (8,)


def test_task_data_matches_the_split_and_calibration_avoids_val_and_test(task: Task) -> None:
    parts = zoo.text._movie_review_splits(0, N_VAL, N_TEST, 4000, CALIB_BATCHES * 8)
    _, tokenizer = zoo.minilm_l6_v2()
    for stored, name in ((task.val, "val"), (task.test, "test")):
        sentences, labels = parts[name]
        assert torch.equal(stored[1], labels)
        assert all(torch.equal(a, b) for a, b in zip(stored[0], zoo.text._tokenize(tokenizer, sentences, 64)))
    calib_ids = torch.cat([input_ids for input_ids, _ in task.calib])
    assert torch.equal(calib_ids, zoo.text._tokenize(tokenizer, parts["calib"][0], 64)[0])


def test_model_is_one_module_with_37_linear_layers(task: Task) -> None:
    model = task.model
    assert isinstance(model, MiniLMClassifier) and not model.training
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert len(linears) == 37 and linears[-1] == "head"
    assert model.head.out_features == 2
    with torch.no_grad():
        logits = model(*task.example_inputs)
    assert logits.shape == (8, 2) and logits.dtype == torch.float32


def test_fp32_is_accurate_and_default_dynamic_int8_stays_close(task: Task) -> None:
    quantized = torch.ao.quantization.quantize_dynamic(task.model, {nn.Linear}, dtype=torch.qint8)
    assert sum(isinstance(module, nnqd.Linear) for module in quantized.modules()) == 37
    with torch.no_grad():
        predictions = [
            torch.cat([model(*inputs).argmax(dim=1) for inputs, _ in task.batches("val")])
            for model in (task.model, quantized)
        ]
    fp32, int8 = (float((predicted == task.val[1]).float().mean()) for predicted in predictions)
    assert fp32 > 0.7  # 0.727 on these 300 sentences, 0.762 on the default 1000; chance is ~0.5
    # Measured: 0.757 here (+3 points: noise on 300 sentences), +0.3 / -1.8 points on the default
    # 1000 val / test sentences, while ~9% of predictions flip (many sentences sit near the boundary).
    assert int8 >= fp32 - 0.03
    assert float((predictions[0] == predictions[1]).float().mean()) >= 0.85


class _SumOfInputs(nn.Module):
    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return first + second


def test_task_accuracy_passes_tuple_inputs_as_separate_arguments() -> None:
    labels = torch.arange(20) % 2
    one_hot = nn.functional.one_hot(labels, 2).float()
    task = Task(
        name="sum",
        model=_SumOfInputs(),
        example_inputs=(one_hot[:2], one_hot[:2]),
        calib=[(one_hot[:4], one_hot[:4])],
        val=((one_hot, torch.zeros_like(one_hot)), labels),
        test=((torch.zeros_like(one_hot), one_hot.flip(1)), labels),
        preprocess=None,
        batch_size=3,
    )
    assert task.accuracy(task.model, "val") == 1.0 and task.accuracy(task.model, "test") == 0.0
    inputs, batch_labels = next(task.batches("val"))
    assert isinstance(inputs, tuple) and [t.shape for t in inputs] == [(3, 2)] * 2 and len(batch_labels) == 3
    task.preprocess = lambda raw: (raw[0], raw[0])  # a preprocess may build the tuple from raw tuples
    assert task.accuracy(task.model, "test") == 0.5


def test_head_is_cached_by_seed_and_n_train(tmp_path: Path) -> None:
    small = dict(n_train=24, n_val=16, n_test=16, calib_batches=1, cache_dir=tmp_path)
    first = zoo.minilm_sentiment_task(**small)
    (head_file,) = tmp_path.iterdir()
    assert head_file.name == "minilm_sentiment_head-v1-seed0-train24-len64.pt"
    assert head_file.stat().st_size < 10_000  # only the 384x2 head is cached
    again = zoo.minilm_sentiment_task(**small)
    assert torch.equal(again.model.head.weight, first.model.head.weight)
    assert all(torch.equal(a, b) for a, b in zip(again.val[0], first.val[0]))
    other_seed = zoo.minilm_sentiment_task(seed=1, **small)
    assert len(list(tmp_path.iterdir())) == 2
    assert not torch.equal(other_seed.val[0][0], first.val[0][0])
