"""Batched training (``stages.fit.bank``): a member trained in a bank is the model it would
be alone, with the same initialisation and the same batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.fit.bank as bank_module
from stages.fit.bank import (
    Banks,
    BatchedAdamW,
    Criterion,
    GateBank,
    HeadBank,
    Reader,
    batch_size_for,
    predict_banks,
    train_banks,
)
from stages.fit.features import FeatureSource
from stages.fit.model import Head, ModelConfig, renamed_from_peft
from stages.fit.train import Objective, heads_criterion

N = 240


def _source(arrays: dict[str, np.ndarray]) -> FeatureSource:
    """In float64: training amplifies rounding, and the comparison is of the arithmetic."""
    source = FeatureSource({k: v.astype(np.float64) for k, v in arrays.items()}, {},
                           in_memory=True, block_rows=N)
    source.materialise()
    return source


def _data(classification: bool) -> tuple[FeatureSource, Objective]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6))
    signal = x[:, 0] + 0.5 * x[:, 1] ** 2
    if classification:
        y = np.digitize(signal, [-0.3, 0.8]).astype(np.int64)
        weight = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
        return _source({"x": x}), Objective(y, True, class_weight=weight)
    return _source({"x": x}), Objective(signal, False, "l1")


def _alone(head: torch.nn.Module, source: FeatureSource, objective: Objective,
           train: np.ndarray, val: np.ndarray, union: np.ndarray, step: int, *, lr: float,
           weight_decay: float, max_epochs: int, patience: int, seed: int) -> None:
    """The reference: one deployed head, ``torch.optim.AdamW``, the bank's shuffled batches of
    ``union`` restricted to its own rows, early stopping on its own validation loss."""

    def loss_on(rows: np.ndarray) -> torch.Tensor:
        out = head(torch.from_numpy(source.take(rows, ["x"])["x"]))
        prediction = out.softmax(-1) if objective.classification else out
        return objective(prediction, torch.from_numpy(objective.y[rows]))

    optimiser = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    head.eval()
    with torch.no_grad():
        best, stale = float(loss_on(val)), 0
    state = {k: v.clone() for k, v in head.state_dict().items()}
    for _ in range(max_epochs):
        head.train()
        for chunk, _ in source.batches(union, step, rng, ["x"]):
            mine = chunk[np.isin(chunk, train)]
            if len(mine):
                optimiser.zero_grad()
                loss_on(mine).backward()
                optimiser.step()
        head.eval()
        with torch.no_grad():
            loss = float(loss_on(val))
        if loss < best - 1e-6:
            best, stale, state = loss, 0, {k: v.clone() for k, v in head.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    head.load_state_dict(state)
    head.eval()


@pytest.mark.parametrize("classification", [False, True])
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_a_member_trained_in_the_bank_predicts_what_it_predicts_alone(classification, adapter):
    source, objective = _data(classification)
    d_out = 3 if classification else 1
    config = ModelConfig(hidden=16, adapter=adapter, lora_r=4, lora_alpha=8)
    rng = np.random.default_rng(1)
    rows = rng.permutation(N)
    val, pool = np.sort(rows[:40]), rows[40:200]
    test = np.sort(rows[200:])
    # members on different rows: two cross-fitting folds and all of the pool
    train = [np.sort(pool[:110]), np.sort(pool[50:]), np.sort(pool)]
    seeds = [11, 12, 13]
    settings = dict(lr=3e-3, weight_decay=1e-3, max_epochs=40, patience=4, seed=5)
    bank = HeadBank(6, d_out, config, seeds)
    with torch.no_grad():  # a non-zero output layer, so every weight gets a gradient
        bank.weight("w3").normal_(0, 0.1)
    bank.double()  # after drawing: its heads copy the start exactly
    heads = [bank.export(m).double() for m in range(len(seeds))]  # the same start
    banks = Banks({"x": bank})
    reader = Reader(source, ["x"], torch.device("cpu"))
    bank.precompute(reader.resident["x"])  # LoRA: the frozen first layer read from a cache
    assert (bank.first is not None) == (adapter == "lora")
    history = train_banks(banks, reader, objective.criterion(torch.device("cpu")), train,
                          [val] * 3, batch_size=32, **settings)
    assert history["epochs"] > settings["patience"]
    batched = predict_banks(banks, reader, test, 64)
    union = np.unique(np.concatenate(train))
    for m, head in enumerate(heads):
        _alone(head, source, objective, train[m], val, union, batch_size_for(len(union), 32),
               **settings)
        with torch.no_grad():
            alone = head(torch.from_numpy(source.take(test, ["x"])["x"]))
        np.testing.assert_allclose(batched[m].numpy(), alone.numpy(), rtol=1e-9, atol=1e-10)
        exported = bank.export(m).double()  # the trained member, deployed as a head
        with torch.no_grad():
            np.testing.assert_allclose(
                exported(torch.from_numpy(source.take(test, ["x"])["x"])).numpy(),
                batched[m].numpy(), rtol=1e-5, atol=1e-6)  # in float32
    assert not np.allclose(batched[0].numpy(), batched[2].numpy())


@pytest.mark.parametrize("rows_per_output", [0, 1000])  # scaling on the weights, on the rows
@pytest.mark.parametrize("classification", [False, True])
def test_members_with_their_own_scaling_and_targets_train_as_they_would_alone(
        classification, rows_per_output, monkeypatch):
    """Cross-validation folds in one bank: each member standardises the features and the
    target (or weighs the classes) by its own training rows."""
    monkeypatch.setattr(bank_module, "ROWS_PER_OUTPUT", rows_per_output)
    source, objective = _data(classification)
    raw = source.take(np.arange(N), ["x"])["x"] * 3.0 + 5.0  # features far from scaled
    source = _source({"x": raw})
    d_out = 3 if classification else 1
    config = ModelConfig(hidden=16, lora_r=4, lora_alpha=8)
    rng = np.random.default_rng(2)
    rows = rng.permutation(N)
    test = np.sort(rows[200:])
    train = [np.sort(rows[:90]), np.sort(rows[60:160])]
    val = [np.sort(rows[160:200]), np.sort(rows[:40])]
    scalings, objectives = [], []
    for t in train:
        source.fit_scaling(t)
        scalings.append(source.scaling["x"])
        if classification:
            counts = np.bincount(objective.y[t], minlength=3)
            objectives.append(Objective(objective.y, True, class_weight=torch.tensor(
                len(t) / (3 * counts), dtype=torch.float64)))
        else:
            y = objective.y
            objectives.append(Objective((y - y[t].mean()) / y[t].std(), False, "l1"))
    base_mean, base_std = raw[np.concatenate(train)].mean(0), raw[np.concatenate(train)].std(0)
    source.scaling = {"x": (base_mean, base_std)}
    settings = dict(lr=3e-3, weight_decay=1e-3, max_epochs=30, patience=4, seed=5)
    bank = HeadBank(6, d_out, config, [21, 22])
    bank.double()
    bank.set_input_scaling(np.stack([base_std / std for _, std in scalings]),
                           np.stack([(base_mean - mean) / std for mean, std in scalings]))
    heads = [bank.export(m).double() for m in range(2)]
    reader = Reader(source, ["x"], torch.device("cpu"))
    bank.precompute(reader.resident["x"])
    train_banks(Banks({"x": bank}), reader,
                heads_criterion(objectives, np.array([0, 1]), torch.device("cpu")), train,
                val, batch_size=32, **settings)
    batched = predict_banks(Banks({"x": bank}), reader, test, 64)
    union = np.unique(np.concatenate(train))
    for m, head in enumerate(heads):
        source.scaling = {"x": scalings[m]}  # the member alone reads its own scaling
        _alone(head, source, objectives[m], train[m], val[m], union,
               batch_size_for(len(union), 32), **settings)
        with torch.no_grad():
            alone = head(torch.from_numpy(source.take(test, ["x"])["x"]))
        np.testing.assert_allclose(batched[m].numpy(), alone.numpy(), rtol=1e-8, atol=1e-9)


def test_lora_members_keep_their_hidden_weights_frozen():
    source, objective = _data(False)
    bank = HeadBank(6, 1, ModelConfig(hidden=8, lora_r=2), [0, 1]).double()
    frozen = bank.fixed.clone()
    train_banks(Banks({"x": bank}), Reader(source, ["x"], torch.device("cpu")),
                objective.criterion(torch.device("cpu")), [np.arange(100), np.arange(50, 150)],
                [np.arange(150, 200)] * 2, lr=1e-2, weight_decay=0.0, batch_size=32,
                max_epochs=5, patience=5, seed=0)
    assert torch.equal(bank.fixed, frozen)  # w1, b1, w2, b2
    trained = {n for n, (trainable, _) in bank.layout.items() if trainable}
    assert trained == {"w3", "b3", "a1", "l1", "a2", "l2", "ws", "bs"}
    assert bank.weight("l1").abs().sum() > 0  # the update learnt


def test_some_members_read_their_own_weights_frozen_and_trained():
    """Members still training read their weights by index; a frozen one is gathered only
    when read, and reads the same values."""
    bank = HeadBank(5, 2, ModelConfig(hidden=8, lora_r=2), [1, 2, 3, 4])
    members = torch.tensor([1, 3])
    full, some = bank.weights(), bank.weights(members)
    assert set(full) == set(bank.layout) and {"w1", "w2"} <= {n for n, (t, _) in
                                                            bank.layout.items() if not t}
    for name in bank.layout:
        assert torch.equal(some[name], full[name][members]), name
    x = torch.randn(3, 5)
    assert torch.equal(bank(x, members), bank(x)[members])


def test_training_flushes_subnormals_only_while_it_runs():
    """Banks train with subnormal floats read as zero (they made the weight generator 4x
    slower); the caller's arithmetic is left as it was, during a failure too."""
    source, _ = _data(False)
    tiny = torch.tensor([1e-40])  # subnormal in float32
    seen = []

    def criterion_rows(out, chunk, members):
        seen.append(float(tiny * 1.0))
        raise RuntimeError("stop")

    bank = HeadBank(6, 1, ModelConfig(hidden=8, lora_r=2), [0]).double()
    with pytest.raises(RuntimeError, match="stop"):
        train_banks(Banks({"x": bank}), Reader(source, ["x"], torch.device("cpu")),
                    Criterion(criterion_rows), [np.arange(100)], [np.arange(150, 200)],
                    lr=1e-2, weight_decay=0.0, batch_size=32, max_epochs=2, patience=2,
                    seed=0)
    assert seen == [0.0]  # flushed inside
    assert float(tiny * 1.0) > 0  # and restored


def test_batched_adamw_matches_torch_and_leaves_inactive_members_alone():
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(3, 4, 2))
    reference = [torch.nn.Parameter(weights[m].detach().clone()) for m in range(3)]
    banks = Banks({"w": _Holder(weights)})
    optimiser = BatchedAdamW(banks, lr=0.01, weight_decay=0.1)
    singles = [torch.optim.AdamW([p], lr=0.01, weight_decay=0.1) for p in reference]
    for step in range(6):
        active = torch.tensor([True, step % 2 == 0, False])
        grads = torch.randn(3, 4, 2)
        weights.grad = grads.clone()
        optimiser.step(active)
        for m in range(3):
            if active[m]:
                reference[m].grad = grads[m].clone()
                singles[m].step()
    for m in range(3):
        torch.testing.assert_close(weights[m].detach(), reference[m].detach())


class _Holder(torch.nn.Module):
    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    @property
    def n_members(self) -> int:
        return self.weight.shape[0]


def test_gate_members_equal_their_exported_gates():
    bank = GateBank(5, 3, 2, ModelConfig(gate_hidden=8, gate_mode="per_output"), [0, 1])
    x = torch.randn(7, 5)
    weights = bank(x)
    assert weights.shape == (2, 7, 3, 2)
    torch.testing.assert_close(weights.sum(2), torch.ones(2, 7, 2))
    for m in range(2):
        torch.testing.assert_close(bank.export(m)(x), weights[m])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_lora_head_is_pefts_lora(dropout):
    """``LoraLinear`` is peft's LoRA on these layers: a peft-wrapped MLP's weights, under
    peft's names (how models saved before ``LoraLinear`` hold them), load into ``Head``
    and give the same outputs, the same weights train, with the same gradients (and the
    same dropout draws)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 3))
    wrapped = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                             target_modules=["0", "2"], modules_to_save=["4"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # away from their start
                p.normal_(0, 0.3)
    head = Head(6, 3, ModelConfig(hidden=16, lora_r=4, lora_alpha=8, lora_dropout=dropout,
                                  skip=False))
    head.load_state_dict(renamed_from_peft({f"mlp.{k}": v
                                            for k, v in wrapped.state_dict().items()}))
    x = torch.randn(32, 6)
    outputs = []
    for model in (wrapped, head.mlp):
        torch.manual_seed(1)  # the same dropout masks
        out = model.train()(x)
        out.square().sum().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1])
    assert outputs[0].abs().max() > 0.1
    theirs = {}
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            (renamed,) = renamed_from_peft({f"mlp.{name}": p})
            theirs[renamed] = p.grad
    ours = {n: p.grad for n, p in head.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(ours)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name])
