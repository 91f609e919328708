"""`refine_arrays` as a notebook calls it: the model left in the mode it was in, the
digital-number warning on the caller's line, `batch_size`, month/biome None and scalars, an empty batch, torch
tensors, and an exported graph's numbers and refusals against the eager model's."""
from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _refiner_helpers import tiny_refiner_config, wake_up
from inference_stage2 import InferenceInputError, refine_arrays
from modeling_stage2.bands import DigitalNumbersWarning
from modeling_stage2.modeling_stage2 import Stage2RefinerModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class DropoutRefiner(torch.nn.Module):
    """refined = opt_v1 + dropout(opt_v1): opt_v1 x 2 in eval mode, something else in train mode; its `frozen` part
    stays in eval mode while the rest trains (as a training loop may leave a frozen backbone)."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)
        self.frozen = torch.nn.Dropout(0.5)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, opt_v1, month, biome):
        return opt_v1 + self.dropout(opt_v1) * self.scale


class WeightReporter(torch.nn.Module):
    """A refiner that keeps `opt_v1` somewhere: its output carries `out_of_range_weight` (B, 1, H, W)."""

    config = SimpleNamespace(keeps_opt_v1=True)

    def forward(self, opt_v1, month, biome):
        return SimpleNamespace(refined=opt_v1 * 2, out_of_range_weight=opt_v1[:, :1] * 0 + 0.25)


def _images(batch=3, size=(20, 23), seed=0):
    return (np.random.default_rng(seed).random((batch, 4, *size)) * 0.4).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_refiner():
    torch.manual_seed(0)
    model = Stage2RefinerModel(tiny_refiner_config(near_black_fallback=True, drop_path_rate=0.5))
    wake_up(model)
    return model.eval()


# ------------------------------------------------------------------------------------------ the model's mode


def test_a_training_model_is_refined_in_eval_mode_and_left_training():
    model = DropoutRefiner().train()
    model.frozen.eval()
    images = _images()
    refined = refine_arrays(model, images)
    np.testing.assert_array_equal(refined, images * 2)  # dropout off while refining
    assert model.training and model.dropout.training  # left training: the next training step keeps its dropout
    assert not model.frozen.training  # each module as it was, not `model.train()` on all of them


def test_the_refiner_in_train_mode_gives_the_eval_numbers_and_keeps_its_mode_and_weights(tiny_refiner):
    images = _images()
    expected = refine_arrays(tiny_refiner, images, month=[1, 5, -1], biome=3)
    model = copy.deepcopy(tiny_refiner).train()
    before = copy.deepcopy(model.state_dict())
    refined = refine_arrays(model, images, month=[1, 5, -1], biome=3)
    np.testing.assert_array_equal(refined, expected)  # drop path (0.5) off
    assert model.training and all(module.training for module in model.modules())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert not tiny_refiner.training


def test_the_mode_is_restored_when_the_model_fails():
    class Failing(DropoutRefiner):
        def forward(self, opt_v1, month, biome):
            raise RuntimeError("out of memory")

    model = Failing().train()
    with pytest.raises(RuntimeError, match="out of memory"):
        refine_arrays(model, _images())
    assert model.training


# ------------------------------------------------------------------------------------------ arguments


def test_the_digital_number_warning_names_the_callers_line():
    """Attributed to a line inside the package, Python's default filter showed it once per session at most."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refine_arrays(DropoutRefiner(), _images() * 10000)
    assert [warning.category for warning in caught] == [DigitalNumbersWarning]
    assert caught[0].filename == __file__


@pytest.mark.parametrize("batch_size", [0, 2.5, "2", None, True])
def test_a_batch_size_that_is_no_positive_whole_number_is_refused_by_name(batch_size):
    with pytest.raises(InferenceInputError, match=r"^batch_size must be a whole number of at least 1, got "):
        refine_arrays(DropoutRefiner(), _images(), batch_size=batch_size)


def test_batches_of_any_size_give_the_numbers_of_one_batch(tiny_refiner):
    images = _images(batch=5)
    whole = refine_arrays(tiny_refiner, images, month=7, biome=[0, 1, 2, 3, -1], batch_size=5)
    for batch_size in (1, 2, np.int64(3), 100):
        split = refine_arrays(tiny_refiner, images, month=7, biome=[0, 1, 2, 3, -1], batch_size=batch_size)
        np.testing.assert_allclose(split, whole, rtol=0, atol=1e-6)


def test_month_and_biome_none_are_unknown_as_in_the_model(tiny_refiner):
    images = _images()
    unknown = refine_arrays(tiny_refiner, images, month=-1, biome=-1)
    np.testing.assert_array_equal(refine_arrays(tiny_refiner, images, month=None, biome=None), unknown)
    with torch.no_grad():
        eager = tiny_refiner(torch.from_numpy(images), None, None).refined.numpy()
    np.testing.assert_allclose(unknown, eager, rtol=0, atol=1e-6)
    with pytest.raises(InferenceInputError, match=r"^month\[1\]: expected one integer, got None"):
        refine_arrays(tiny_refiner, images, month=[7, None, 7])  # inside a list, None is refused as in the model


def test_an_error_in_one_month_for_every_image_names_the_argument_not_an_entry():
    with pytest.raises(InferenceInputError, match=r"^month: month 13 is out of range; use 1\.\.12"):
        refine_arrays(DropoutRefiner(), _images(), month=13)
    with pytest.raises(InferenceInputError, match=r"^biome: expected one integer, got 2\.5$"):
        refine_arrays(DropoutRefiner(), _images(), biome=2.5)
    with pytest.raises(InferenceInputError, match=r"^biome\[2\]: biome code 17 is out of range"):
        refine_arrays(DropoutRefiner(), _images(), biome=[1, 2, 17])


def test_an_empty_batch_gives_an_empty_weight_from_a_model_that_reports_one():
    refined, weight = refine_arrays(WeightReporter(), _images(batch=0), return_out_of_range_weight=True)
    assert refined.shape == (0, 4, 20, 23) and refined.dtype == np.float32
    assert weight is not None and weight.shape == (0, 20, 23) and weight.dtype == np.float32
    refined, weight = refine_arrays(WeightReporter(), _images(batch=2), return_out_of_range_weight=True)
    np.testing.assert_array_equal(weight, np.full((2, 20, 23), 0.25, np.float32))
    assert refine_arrays(DropoutRefiner(), _images(batch=0), return_out_of_range_weight=True)[1] is None


def test_torch_tensors_that_require_grad_or_are_bfloat16_are_refined_as_their_values(tiny_refiner):
    images = _images()
    expected = refine_arrays(tiny_refiner, images, month=[1, 5, -1], biome=3)
    tensor = torch.from_numpy(images).requires_grad_()
    np.testing.assert_array_equal(
        refine_arrays(tiny_refiner, tensor, month=torch.tensor([1, 5, -1]), biome=torch.tensor(3)), expected
    )
    bf16 = torch.from_numpy(images).bfloat16()
    np.testing.assert_array_equal(
        refine_arrays(tiny_refiner, bf16, month=[1, 5, -1], biome=3),
        refine_arrays(tiny_refiner, bf16.float().numpy(), month=[1, 5, -1], biome=3),
    )
    assert tensor.grad is None


# ------------------------------------------------------------------------------------------ an exported graph


@pytest.fixture(scope="module")
def exported_pt2(tiny_refiner, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from modeling_stage2.export import export_refiner
    from modeling_stage2.onnx_runtime import ExportedRefiner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("review") / "pt2"
    export_refiner(tiny_refiner, folder, format="torch_export", check=False)
    torch.set_num_threads(threads)
    return ExportedRefiner(folder)


def test_an_exported_graph_gives_the_eager_numbers_through_refine_arrays(tiny_refiner, exported_pt2):
    images = _images(size=(30, 33))
    images[0, :, :6, :6] = 0.002  # near-black: the weight is 1 there
    arguments = {"month": [1, 5, -1], "biome": 3, "return_out_of_range_weight": True}
    refined, weight = refine_arrays(exported_pt2, images, **arguments)
    expected, expected_weight = refine_arrays(tiny_refiner, images, **arguments)
    np.testing.assert_allclose(refined, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(weight, expected_weight)
    assert expected_weight.max() == 1.0


def test_an_exported_graph_takes_numpy_views_of_any_strides(exported_pt2):
    images = _images(size=(30, 33))
    flipped = images[:, :, ::-1]
    refined = exported_pt2(flipped, np.array([1, 5, -1]), 3).refined
    assert torch.equal(refined, exported_pt2(np.ascontiguousarray(flipped), np.array([1, 5, -1]), 3).refined)


def test_an_exported_graph_refuses_what_refine_arrays_refuses_with_the_same_message(tiny_refiner, exported_pt2):
    images = _images(size=(30, 33))
    for arguments in ({"month": 13}, {"biome": [0, 1, 17]}, {"month": 1.5}, {"batch_size": 0}):
        messages = []
        for model in (tiny_refiner, exported_pt2):
            with pytest.raises(InferenceInputError) as error:
                refine_arrays(model, images, **arguments)
            messages.append(str(error.value))
        assert messages[0] == messages[1]
