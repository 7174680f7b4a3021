"""The tuning study's search space (flows.tune): the defaults are its first point; fixed knobs are not searched."""

from __future__ import annotations

import optuna

from flows.tune import default_point, suggest_params
from models.sasrec import SASRecConfig
from models.trainer import TrainConfig


def test_the_first_trial_of_a_new_study_is_the_defaults_and_fixed_knobs_are_not_searched() -> None:
    point = default_point("sasrec", {"max_seq_len": 50}, {}, sampled=False)
    cfg, train = SASRecConfig(n_items=10, max_seq_len=50), TrainConfig()
    assert point == {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                     "dropout": cfg.dropout, "max_seq_len": 50, "lr": train.lr,
                     "weight_decay": train.weight_decay, "batch_size": train.batch_size}
    # a value outside the space (max_seq_len 64 is not a choice) is left to the sampler, not enqueued
    assert "max_seq_len" not in default_point("sasrec", {"max_seq_len": 64}, {}, sampled=False)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(point)
    trial = study.ask()
    model_params, train_params = suggest_params(trial, "sasrec", sampled=False)
    assert {**model_params, **train_params} == point  # the enqueued trial trains exactly the defaults
    # knobs the caller fixes are not searched; the sampled softmax adds its negatives
    _, fixed_train = suggest_params(study.ask(), "sasrec", sampled=True, fixed=frozenset({"batch_size", "lr"}))
    assert set(fixed_train) == {"weight_decay", "n_negatives"}


def test_a_second_worker_or_a_resumed_study_does_not_repeat_the_first_workers_random_start() -> None:
    from flows.tune import process_sampler

    def first_point(sampler: optuna.samplers.BaseSampler) -> dict:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        return suggest_params(study.ask(), "sasrec", sampled=False)[0]

    assert first_point(process_sampler(42, 0)[0]) == first_point(process_sampler(42, 0)[0])  # reproducible
    assert first_point(process_sampler(42, 0)[0]) != first_point(process_sampler(42, 3)[0])  # joins later: new stream
