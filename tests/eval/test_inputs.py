"""Evaluation inputs: --set parsing, which dataset, and vmoe's evaluation crop on real pixels."""

from __future__ import annotations

import numpy as np
import pytest

from visionmoe.eval.inputs import EvalOptions, eval_data_config, parse_settings, prepare_image
from visionmoe.loading import EvalPreprocess, ModelInfo
from visionmoe.models.config import ViTConfig
from visionmoe.recipes import get_recipe


def _info(size=224, preprocess=None, experiment=None, kind="pretrained"):
    config = ViTConfig(image_size=size, patch_size=16, hidden_size=16, num_heads=2, mlp_dim=32)
    return ModelInfo(
        source="m",
        kind=kind,
        model_config=config,
        experiment=experiment,
        class_names=tuple(str(i) for i in range(config.num_classes)),
        preprocess=preprocess or EvalPreprocess.vmoe_default(size),
    )


def test_resize_small_then_central_crop_on_a_two_tone_image():
    # 256 x 512 image, columns 0..299 black, 300..511 white. resize_small(256): the shorter side
    # is already 256, so the factor is 1 and nothing moves. central_crop(224): top (256-224)//2
    # = 16, left (512-224)//2 = 144, so crop columns 144..367 = 156 black then 68 white.
    image = np.zeros((256, 512, 3), np.uint8)
    image[:, 300:] = 255
    x = prepare_image(image, _info(224))
    assert tuple(x.shape) == (1, 3, 224, 224)
    assert (x[..., :156] == -1).all() and (x[..., 156:] == 1).all()


def test_square_resize_for_models_fine_tuned_at_other_sizes():
    # resize(384) of a constant image is that constant, 200 -> 200 / 127.5 - 1, up to one grey
    # level: vmoe's resize truncates to uint8, so 199.99998 in float arithmetic becomes 199.
    image = np.full((300, 500, 3), 200, np.uint8)
    x = prepare_image(image, _info(384))
    assert tuple(x.shape) == (1, 3, 384, 384)
    np.testing.assert_allclose(x.numpy(), 200 / 127.5 - 1, atol=1 / 127.5 + 1e-6)


def test_settings_are_typed_and_sorted_by_section():
    settings = parse_settings(
        ["model.capacity_factor=1.5", "data.kind=folder", "preprocess.resize_small=none"]
    )
    assert settings.model == {"capacity_factor": 1.5}
    assert settings.data == {"kind": "folder"} and settings.preprocess == {"resize_small": None}
    with pytest.raises(ValueError, match="SECTION.FIELD=VALUE with SECTION one of model"):
        parse_settings(["train.steps=3"])
    with pytest.raises(ValueError, match="unknown setting 'preprocess.crop'"):
        parse_settings(["preprocess.crop=3"])
    with pytest.raises(ValueError, match="expects an integer"):
        parse_settings(["preprocess.size=big"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        EvalOptions(batch_size=0)


def test_which_dataset_an_evaluation_reads():
    run = get_recipe("fashion_mnist_vmoe")
    own = eval_data_config(_info(experiment=run, kind="run"), EvalOptions())
    assert own == run.data
    # --data keeps the run's kind unless data.kind says otherwise.
    assert eval_data_config(_info(experiment=run, kind="run"), EvalOptions(data="x.npz")).kind == (
        run.data.kind
    )
    named = eval_data_config(_info(), EvalOptions(data="imagenet/"))
    assert (named.kind, named.path) == ("folder", "imagenet/")
    with pytest.raises(ValueError, match="no dataset of its own; pass --data PATH"):
        eval_data_config(_info(), EvalOptions())
