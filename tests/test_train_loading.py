"""lattice.train.loading: configs (and a checkpoint) -> (module, datamodule) as ``lattice fit`` builds them."""
import ast
import os

import pytest
import torch
import yaml

from lattice.data.datamodule import LatticeDataModule
from lattice.train.loading import checkpoint_model_spec, load_from_config, parse_config
from lattice.train.module import LatticeModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, **model):
    config = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False},
        "model": {"network": {"class_path": "lattice.models.DLRM", "init_args": {"dim": 8}}, **model},
        "data": {"cache_dir": str(tmp_path / "cache"), "batch_size": 64,
                 "synthetic": {"num_users": 50, "num_items": 40, "domains": [{"name": "feed", "rows": 200}]}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_builds_module_and_datamodule_with_the_linked_schema_and_overrides(tmp_path):
    cfg = _config(tmp_path)
    module, dm = load_from_config(cfg, overrides=["--model.network.init_args.dim=4", "--model.sparse_lr=0.5"])
    assert isinstance(module, LatticeModule) and isinstance(dm, LatticeDataModule)
    assert module.network.schema is dm.schema
    assert module.network.dim == 4 and module.hparams.sparse_lr == 0.5
    # seeded from the config like `lattice fit`: the same configs give the same initial weights
    again, _ = load_from_config([cfg], overrides=["--model.network.init_args.dim=4"])
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values()))


def test_checkpoint_weights_and_hyper_parameters_win(tmp_path):
    cfg = _config(tmp_path)
    module, _ = load_from_config(cfg)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in module.state_dict().items()}
    hparams = {k: v for k, v in module.hparams.items() if k != "network"}
    hparams["sparse_lr"] = 0.123
    ckpt = str(tmp_path / "m.ckpt")
    torch.save({"state_dict": state, "hyper_parameters": hparams}, ckpt)
    loaded, _ = load_from_config(cfg, ckpt)
    assert loaded.hparams.sparse_lr == 0.123
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    spec = checkpoint_model_spec({"class_path": "lattice.train.module.LatticeModule",
                                  "init_args": {"sparse_lr": 1.0, "network": {"class_path": "x"}}}, ckpt)
    assert spec["init_args"]["sparse_lr"] == 0.123 and spec["init_args"]["network"] == {"class_path": "x"}
    assert checkpoint_model_spec({}, str(tmp_path / "absent.ckpt")) is None


def test_parse_config_builds_nothing(tmp_path):
    config = parse_config(_config(tmp_path))
    assert config.model.init_args.network.class_path == "lattice.models.DLRM"
    assert not (tmp_path / "cache").exists()


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_from_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_from_config(_config(tmp_path), str(tmp_path / "nope.ckpt"))
    torch.save({"weights": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="state_dict"):
        load_from_config(_config(tmp_path), str(tmp_path / "bare.ckpt"))


def test_commands_do_not_import_the_cli():
    tree = ast.parse(open(os.path.join(ROOT, "lattice", "commands.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "lattice.cli" not in imported
