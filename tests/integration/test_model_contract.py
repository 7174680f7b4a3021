"""Every registered model class goes through the whole contract: train, checkpoint, log as the pyfunc,
load back from the MLflow registry and score exactly like the trained module.

A new model that is one file plus one line in ``models/factory.py`` is covered here without edits.
"""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.contract import SequentialModel
from models.factory import MODELS, build_config, build_model
from models.ranking import recommend
from models.sequences import leave_one_out
from models.trainer import TrainConfig, train_model
from models.vocab import ItemVocabulary

N_ITEMS = 30
VOCAB = ItemVocabulary([f"i{k}" for k in range(1, N_ITEMS + 1)])


def _toy_split() -> object:
    rng = np.random.default_rng(0)
    seqs = {f"u{u}": (rng.integers(0, N_ITEMS) + np.arange(rng.integers(5, 10))) % N_ITEMS + 1 for u in range(30)}
    return leave_one_out(seqs)


def _tiny_config(name: str) -> object:
    """The smallest config of model ``name``: its defaults, shrunk where a field is a width or depth."""
    cls = MODELS[name].config_class
    small = {"n_items": N_ITEMS, "max_seq_len": 6}
    for field in dataclasses.fields(cls):
        if field.name in ("d_model", "hidden_size"):
            small[field.name] = 8
        elif field.name in ("n_layers", "n_heads"):
            small[field.name] = 1
    return build_config(name, **small)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.create_experiment("contract", artifact_location=(root / "artifacts").as_uri())
    return uri


def test_every_model_class_is_registered_under_its_own_name() -> None:
    assert {"sasrec", "gru4rec"} <= set(MODELS)
    for name, cls in MODELS.items():
        assert cls.name == name and dataclasses.is_dataclass(cls.config_class)
        model = build_model(_tiny_config(name))
        assert type(model) is cls and isinstance(model, SequentialModel)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_checkpoint_pyfunc_load_and_score(name: str, tracking: str, tmp_path) -> None:
    from registry.store import load_version, log_model

    config = _tiny_config(name)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=5e-3, seed=1, device="cpu", num_threads=1)
    result = train_model(_toy_split(), VOCAB, config, tcfg, progress=False)
    assert type(result.model) is MODELS[name] and len(result.history) == 2

    path = save_checkpoint(tmp_path / "model.pt", result.model, VOCAB, {"run": "contract"})
    restored, vocab, _ = load_checkpoint(path)
    assert type(restored) is MODELS[name] and restored.config == config and vocab == VOCAB

    registered = f"contract-{name}"
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("contract").experiment_id):
        info = log_model(path, registered_model_name=registered)
    loaded = load_version(registered, version=info.registered_model_version)
    assert type(loaded.model) is MODELS[name] and loaded.vocab == VOCAB

    batch = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10]])
    expected = result.model.cpu().score(batch)
    torch.testing.assert_close(loaded.model.score(batch), expected, rtol=0, atol=0)
    assert expected.shape == (3, N_ITEMS + 1) and torch.isinf(expected[:, 0]).all()
    assert torch.isfinite(expected[:, 1:]).all()
    assert loaded.model.item_embeddings().shape[0] == N_ITEMS + 1

    pyfunc = mlflow.pyfunc.load_model(f"models:/{registered}/{info.registered_model_version}")
    out = pyfunc.predict(pd.DataFrame({"history": [["i1", "i2", "i3"], []]}), params={"k": 4})
    assert out["item_ids"][0] == [i for i, _ in recommend(result.model, VOCAB, [["i1", "i2", "i3"]], k=4)[0]]
    assert not {"i1", "i2", "i3"} & set(out["item_ids"][0]) and len(out["item_ids"][1]) == 4


def test_a_checkpoint_without_a_class_name_loads_as_sasrec(tmp_path) -> None:
    from models.checkpoint import checkpoint_dict, model_from_dict

    sasrec = build_model(_tiny_config("sasrec"))
    legacy = checkpoint_dict(sasrec, VOCAB)
    legacy.pop("model_class")  # a format-1 checkpoint, written before the contract
    model, _ = model_from_dict(legacy)
    assert type(model).__name__ == "SASRec"
    torch.testing.assert_close(model.score(torch.tensor([[1, 2]])), sasrec.eval().score(torch.tensor([[1, 2]])))
