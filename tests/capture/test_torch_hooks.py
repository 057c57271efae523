"""Torch capture: which modules are targeted, what the hooks capture, that they always go away,
and that the scales equal a brute force over the same tensors (calibrate_torch and capture).

The oracle records every targeted module's inputs and outputs with hooks of its own and runs
the calibrators directly on them (or on the parameters, for weights).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from qcal_export import (
    DataError,
    Override,
    Recipe,
    RecipeError,
    TensorSpec,
    calibrate_torch,
    capture,
    load_scales,
    save_scales,
)
from qcal_export.calibrate.tensor import calibrate_weight
from qcal_export.calibrators import BlockHessian, MaxCalibrator, MseCalibrator
from qcal_export.capture.torch_hooks import find_modules
from qcal_export.from_torch.calibration import fake_quant_activation
from qcal_export.spec.formats import INT8
from qcal_export.spec.granularity import PerAxis, PerBlock, PerTensor
from qcal_export.spec.recipe import recipe_from_dict


class Gate(nn.Module):
    """A custom module type with a weight of unknown layout."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.weight)


class Net(nn.Module):
    """Conv1d -> ConvTranspose1d -> LayerNorm -> Gate -> Linear -> Linear on ``[b, 4, 4]``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.up = nn.ConvTranspose1d(6, 4, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.gate = Gate(8)
        self.fc = nn.Linear(8, 5)
        self.skip = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.up(torch.relu(self.conv(x)))
        return self.skip(self.fc(self.gate(self.norm(h)) * scale))


RECIPE = Recipe(
    module_types=("Gate",),
    modules=("no*",),
    overrides=(Override(nodes="norm", activation=TensorSpec()),),
    exclude_nodes=("sk*",),
)
TARGETS = ["conv", "up", "norm", "gate", "fc"]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def batches(n: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 4, 4, generator=generator) * (i + 1) for i in range(n)]


def recorded(model: nn.Module, names: list[str], data: list, run=None) -> dict[str, list]:
    """Every input and output of the named modules over ``data`` (the brute-force oracle)."""
    seen: dict[str, list] = {}

    def keep(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.setdefault(f"{name}.input", []).append(args[0])
        seen.setdefault(f"{name}.output", []).append(output)

    handles = [
        model.get_submodule(name).register_forward_hook(functools.partial(keep, name))
        for name in names
    ]
    with torch.no_grad():
        for batch in data:
            (run or model)(batch)
    for handle in handles:
        handle.remove()
    return seen


def no_hooks(model: nn.Module) -> bool:
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


def test_targets_default_types_a_name_pattern_and_a_custom_type(net):
    found = {t.name: t for t in find_modules(net, RECIPE)}
    assert list(found) == TARGETS
    assert found["conv"].weight_granularity == PerAxis(0)
    assert found["up"].weight_granularity == PerAxis(1)  # ConvTranspose [in, out / g, k]
    assert found["fc"].weight_granularity == PerAxis(0)
    assert (found["norm"].activation, found["norm"].weight) == (TensorSpec(), None)
    assert found["gate"].weight_granularity == PerTensor()
    assert found["gate"].notes == ["weight layout unknown: calibrated per tensor"]
    blocks = Recipe(weight=TensorSpec("int4", block_size=4), activation=None)
    found = {t.name: t for t in find_modules(net, blocks)}
    assert found["fc"].weight_granularity == PerBlock(1, 4)
    assert found["up"].weight_granularity == PerBlock(0, 4)


def test_override_op_types_name_module_classes_or_their_onnx_op_types(net):
    fp8 = TensorSpec("fp8")
    recipe = Recipe(
        overrides=(
            Override(op_types=("ConvTranspose1d",), activation=fp8, weight=fp8),
            Override(op_types=("Gemm",), activation=None, weight=TensorSpec()),
        ),
        exclude_op_types=("Conv",),
    )
    found = {t.name: t for t in find_modules(net, recipe)}
    assert list(found) == ["up", "fc", "skip"]
    assert found["up"].activation == fp8
    assert (found["fc"].activation, found["fc"].weight_granularity) == (None, PerTensor())


def test_recipes_that_cannot_work_fail_before_any_batch(net):
    with pytest.raises(RecipeError, match=r"'conv'.*nvfp4 activation blocks"):
        find_modules(net, Recipe(activation=TensorSpec("nvfp4"), weight=None))
    with pytest.raises(RecipeError, match=r"'gate'.*layout of its weight is unknown"):
        find_modules(net, Recipe(module_types=("Gate",), weight=TensorSpec("int4")))
    with pytest.raises(RecipeError, match="outputs take their blocks"):
        find_modules(net, Recipe(output=TensorSpec("nvfp4")))
    with pytest.raises(RecipeError, match="no module to calibrate"):
        calibrate_torch(nn.ReLU(), batches())
    with pytest.raises(RecipeError, match="unknown option"):
        calibrate_torch(net, batches(), formt="fp8")


def test_recipe_output_and_module_types_from_dict():
    recipe = recipe_from_dict(
        {
            "output": {"format": "fp8"},
            "module_types": ["Gate"],
            "overrides": [{"nodes": "fc", "output": {"format": "int8", "method": "mse"}}],
        }
    )
    assert recipe.output == TensorSpec("fp8") and recipe.module_types == ("Gate",)
    assert recipe.overrides[0].output == TensorSpec(method="mse")
    with pytest.raises(RecipeError, match=r"output.*weight format"):
        recipe_from_dict({"output": {"format": "int4"}})
    with pytest.raises(RecipeError, match="module_types must be a list"):
        recipe_from_dict({"module_types": "Gate"})


def test_hooks_and_training_flags_are_restored_also_when_a_batch_raises(net):
    net.train()
    net.norm.eval()
    result = calibrate_torch(net, batches(), RECIPE)
    assert no_hooks(net) and net.training and not net.norm.training and net.fc.training
    bad = [*batches(1), torch.randn(2, 3, 4), *batches(1)]  # 3 channels: conv1d raises
    with pytest.raises(RuntimeError):
        calibrate_torch(net, bad, RECIPE)
    assert no_hooks(net) and net.training and not net.norm.training
    assert result.modules == TARGETS


def test_tensor_tuple_and_dict_batches_and_amax_equal_a_brute_force_max(net):
    x = batches()
    data = [x[0], (x[1], 2.0), {"x": x[2], "scale": 0.5}]
    recipe = Recipe(module_types=("Gate",), output=TensorSpec("uint8"))
    result = calibrate_torch(net, data, recipe)
    assert result.batches_per_pass == [3]
    names = ["conv", "up", "gate", "fc", "skip"]
    seen = recorded(net, names, data, run=lambda b: net(b) if torch.is_tensor(b) else _call(net, b))
    for key, values in seen.items():
        flat = torch.cat([v.reshape(-1) for v in values])
        entry = result.scales[key]
        if key.endswith(".output"):  # asymmetric: the range itself
            assert (float(entry.min), float(entry.max)) == (flat.min().item(), flat.max().item())
        else:
            assert float(entry.amax) == flat.abs().max().item()


def _call(model: nn.Module, batch):
    return model(**batch) if isinstance(batch, dict) else model(*batch)


class MoE(nn.Module):
    """Three Linear experts; each token goes to the expert ``route`` names."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            mask = route == index
            out[mask] = expert(x[mask])
        return out


def test_an_expert_that_gets_no_tokens_is_skipped_not_failed():
    torch.manual_seed(0)
    model = MoE().eval()
    x = [torch.randn(6, 8), torch.randn(6, 8) * 3]
    routes = [torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([0, 1, 0, 1, 0, 0])]
    data = [{"x": a, "route": r} for a, r in zip(x, routes, strict=True)]
    result = calibrate_torch(model, data, Recipe(output=TensorSpec()))
    assert result.scales["experts.2.input"].notes == ["no values collected: amax floored"]
    assert result.scales["experts.2.output"].notes == ["no values collected: amax floored"]
    assert float(result.scales["experts.1.input"].amax) == x[1][[1, 3]].abs().max().item()
    direct = MaxCalibrator(INT8, PerAxis(0))
    direct.collect(model.experts[2].weight.detach())
    assert torch.equal(result.scales["experts.2.weight"].amax, direct.compute_amax())


@pytest.mark.parametrize("method", ["max", "mse"])
def test_weights_equal_a_calibrator_run_on_the_parameter(net, method):
    recipe = Recipe(weight=TensorSpec(method=method, per_channel=True))
    result = calibrate_torch(net, batches(), recipe)
    for name, axis in (("conv", 0), ("up", 1), ("fc", 0)):
        weight = net.get_submodule(name).weight.detach()
        first = MaxCalibrator(INT8, PerAxis(axis))
        first.collect(weight)
        direct = first
        if method == "mse":
            direct = MseCalibrator(INT8, PerAxis(axis))
            direct.set_initial_range(*first.compute_range())
            direct.collect(weight)
        assert torch.equal(result.scales[f"{name}.weight"].amax, direct.compute_amax())


def test_mse_activations_take_two_passes_and_equal_a_brute_force(net):
    data = batches()
    recipe = Recipe(activation=TensorSpec(method="mse"))
    result = calibrate_torch(net, data, recipe)
    assert result.batches_per_pass == [3, 3]
    for values in [recorded(net, ["fc"], data)["fc.input"]]:
        first = MaxCalibrator(INT8, PerTensor())
        for v in values:
            first.collect(v)
        direct = MseCalibrator(INT8, PerTensor())
        direct.set_initial_range(*first.compute_range())
        for v in values:
            direct.collect(v)
        assert torch.equal(result.scales["fc.input"].amax, direct.compute_amax())
    with pytest.raises(DataError, match="one-shot iterator"):
        calibrate_torch(net, iter(data), recipe)
    assert calibrate_torch(net, iter(data)).batches_per_pass == [3]
    assert calibrate_torch(net, data, max_batches=2).batches_per_pass == [2]


def test_the_context_form_runs_the_scripts_own_loop(net):
    data = batches()
    recipe = Recipe(activation=TensorSpec(method="mse"))
    with capture(net, recipe) as cal:
        for _ in cal.passes():
            for x in data:
                net(x)
    assert no_hooks(net)
    result = cal.result()
    reference = calibrate_torch(net, data, recipe)
    assert result.batches_per_pass == [3, 3]
    assert all(torch.equal(result.scales[k].amax, v.amax) for k, v in reference.scales.items())
    with capture(net, recipe) as cal:
        for x in data:
            net(x)
        with pytest.raises(RecipeError, match=r"fc.input \(mse\).*second pass.*passes\(\)"):
            cal.result()
    assert no_hooks(net)
    with capture(net) as cal:
        for x in data:
            net(x)
    assert cal.result().batches_per_pass == [3]
    with capture(net) as cal, pytest.raises(DataError, match="did not run during pass 1"):
        cal.result()


def test_hessian_weighted_nvfp4_weights_take_h_from_the_linear_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    data = [torch.randn(4, 32) for _ in range(2)]
    spec = TensorSpec("nvfp4", method="nvfp4-mse", options={"hessian": True})
    result = calibrate_torch(model, data, Recipe(activation=None, weight=spec))
    hessian = BlockHessian()
    for x in data:
        hessian.collect(x)
    weight = model[0].weight.detach()
    direct = calibrate_weight("0.weight", weight, spec, PerBlock(1, 16), "skip", hessian.hessian)
    assert torch.equal(result.scales["0.weight"].scale, direct.scale)
    assert result.scales["0.weight"].notes == []


def test_fake_quantize_is_the_qdq_arithmetic_and_leaves_the_model_as_found(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(8, 4).eval()
    data = [torch.randn(3, 8) for _ in range(2)]
    result = calibrate_torch(model, data, Recipe(output=TensorSpec("fp8")))
    assert set(result.scales) == {"input", "output", "weight"}  # the root module
    weight = model.weight.detach().clone()
    s = result.scales
    want = nn.functional.linear(
        fake_quant_activation(s["input"], data[1]),
        s["weight"].fake_quant_weight(weight),
        model.bias,
    )
    with torch.no_grad(), result.fake_quantize():
        got = model(data[1])
    assert torch.equal(got, fake_quant_activation(s["output"], want.detach()))
    assert torch.equal(model.weight, weight) and no_hooks(model)
    save_scales(tmp_path / "s.safetensors", result.scales, "")
    loaded, _ = load_scales(tmp_path / "s.safetensors")
    assert all(torch.equal(loaded[k].scale, v.scale) for k, v in result.scales.items())


def test_data_that_is_not_batches_is_a_data_error(net):
    with pytest.raises(DataError, match="not an iterable of batches"):
        calibrate_torch(net, torch.randn(2, 4, 4))
    with pytest.raises(DataError, match="batch 0 is a str"):
        calibrate_torch(net, ["abc"])
    assert no_hooks(net)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_is_calibrated_on_its_device_as_on_the_cpu(net, tmp_path):
    data = batches()
    recipe = Recipe(module_types=("Gate",), output=TensorSpec("fp8"))
    on_cpu = calibrate_torch(net, data, recipe)
    on_gpu = calibrate_torch(net.cuda(), data, recipe)  # batches move to the model's device
    assert on_gpu.scales.keys() == on_cpu.scales.keys()
    for key, entry in on_cpu.scales.items():
        assert torch.equal(on_gpu.scales[key].amax, entry.amax), key
    with torch.no_grad(), on_gpu.fake_quantize():
        assert net(data[0].cuda()).is_cuda
    result = on_gpu.export_onnx((data[0].cuda(),), tmp_path / "q.onnx", dynamo=False)
    assert set(result.mapped) == {"conv", "up", "fc", "skip"}
    assert "also an input quantized as int8" in result.outputs_not_exported["fc"]
