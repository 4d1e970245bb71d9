import pytest
import torch

import visionmoe
from visionmoe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visionmoe.train.config import OptimConfig
from visionmoe.train.optim import build_optimizer


def _model_and_opt():
    model = visionmoe.create_model("vmoe_debug")
    opt = build_optimizer(model, OptimConfig())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_with_optimizer_and_rng(tmp_path):
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 3, model, opt, {"name": "x"})
    rng_at_save = torch.get_rng_state()
    assert path.name == "step_0000003"
    ckpt = load_checkpoint(tmp_path, with_optimizer=True)
    assert ckpt["meta"]["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)
    fresh = build_optimizer(visionmoe.create_model("vmoe_debug"), OptimConfig())
    fresh.load_state_dict(ckpt["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    for i in a["state"]:
        for name in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][name]), b["state"][i][name])
    assert torch.equal(ckpt["rng"], rng_at_save)


def test_keeps_newest_and_latest_pointer(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_0000002", "step_0000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000003"


def test_truncated_file_is_refused(tmp_path):
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path)


def test_crash_mid_save_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, 1, model, opt, {})
    import visionmoe.train.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, opt, {})
    assert load_checkpoint(tmp_path)["meta"]["step"] == 1


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no run or checkpoint"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
