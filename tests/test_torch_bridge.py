"""The torch bridge: gradients of every regularizer, DSMM's temperature, folding, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from onnxcomp.torch import RangeRegularizer, export_onnx
from onnxcomp.torch.regularizers import KINDS

from conftest import outputs


def small_cnn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 8 * 8, 3),
    ).to(dtype)


@pytest.mark.parametrize("backend", ["c", "torch"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("fold_bn,per_channel", [(False, False), (True, True)])
def test_gradcheck_float64(kind, fold_bn, per_channel, backend):
    model = small_cnn(torch.float64)
    with torch.no_grad():  # running statistics that are not all ones, so folding matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    reg = RangeRegularizer(model, kind=kind, fold_bn=fold_bn, per_channel=per_channel, backend=backend).double()
    if kind == "soft-min-max":
        reg.temperatures.mul_(0.1)  # a softer max keeps finite differences smooth
    layer = model[3]
    learned = [p for p in reg.parameters()]

    def loss(weight):
        original = layer.weight
        del layer.weight
        layer.weight = weight
        try:
            return reg()
        finally:
            layer.weight = original

    # L-inf's max has a kink only at ties, which random weights avoid.
    weight = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (weight,), eps=1e-6, atol=1e-5)
    if learned:
        params = [p.detach().clone().requires_grad_(True) for p in learned]
        assert torch.autograd.gradcheck(lambda *ps: _value_with_params(reg, ps), tuple(params), eps=1e-6, atol=1e-5)


def _value_with_params(reg, values):
    """reg() with its learnable parameters replaced by `values` (tensors that require grad)."""
    names = [name for name, _ in reg.named_parameters()]
    saved = {name: getattr(reg, name) for name in names}
    try:
        for name, value in zip(names, values):
            delattr(reg, name)
            setattr(reg, name, value)
        return reg()
    finally:
        for name, value in saved.items():
            delattr(reg, name)
            reg.register_parameter(name, value)


def mixed_model(dtype=torch.float64) -> nn.Module:
    """Every layout the kernel is handed: grouped Conv, ConvTranspose, a channels-last
    weight, a BatchNorm with negative and zero γ, one without γ, Linear after BatchNorm1d."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6, affine=False),
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 7), nn.BatchNorm1d(7), nn.Linear(7, 3),
    ).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.uniform_(0.3, 3.0)
                if module.weight is not None:
                    module.weight.uniform_(-2.0, 2.0)
        model[0].weight[2].zero_()  # an all-zero channel: ties everywhere
        model[1].weight[1] = 0.0  # γ = 0 folds a channel to nothing
        model[3].weight.data = model[3].weight.data.to(memory_format=torch.channels_last)
    return model


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("fold_bn,per_channel", [(False, False), (True, False), (False, True), (True, True)])
def test_kernel_matches_torch_operations(kind, fold_bn, per_channel, dtype, rtol):
    """The C kernel and the torch operations give one loss and the same gradients."""
    results = []
    for backend in ("c", "torch"):
        model = mixed_model(dtype)
        reg = RangeRegularizer(model, kind=kind, fold_bn=fold_bn, per_channel=per_channel, backend=backend).to(dtype)
        with torch.no_grad():
            if kind == "dsmm":
                reg.temperatures.copy_(torch.tensor([0.1, 3.0, 30.0, 300.0, 1.0]))
            if kind == "margin":  # the loss takes |M|: a negative margin's gradient changes sign
                reg.margins.mul_(torch.tensor([1.0, -1.0, 0.5, -0.2, 1.0]))
        value = reg() * 3.0  # a scale that backward must pass on
        value.backward()
        params = [*model.parameters(), *reg.parameters()]
        results.append((value.item(), [p.grad for p in params if p.grad is not None]))
    (kernel_value, kernel_grads), (torch_value, torch_grads) = results
    assert kernel_value == pytest.approx(torch_value, rel=rtol) and len(kernel_grads) == len(torch_grads)
    for a, b in zip(kernel_grads, torch_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def test_without_a_compiler_the_torch_operations_step_in(tmp_path, monkeypatch):
    from onnxcomp.torch import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ONNXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        model = small_cnn()
        with pytest.warns(UserWarning, match="no C compiler"):
            value = RangeRegularizer(model, kind="dsmm", fold_bn=True, per_channel=True)()
        expected = RangeRegularizer(model, kind="dsmm", fold_bn=True, per_channel=True, backend="torch")()
        assert value.item() == pytest.approx(expected.item(), rel=1e-6)
        with pytest.raises(RuntimeError, match="backend='c' needs"):
            RangeRegularizer(model, kind="dsmm", backend="c")()
        assert not (tmp_path / "cache").exists()
    finally:
        native.library.cache_clear()


def test_the_kernel_is_built_once_and_leaves_subnormals_alone(tmp_path, monkeypatch):
    """Built into the cache on first use and loaded from it after; loading it does not
    switch the process to flushing subnormal numbers to zero (as -ffast-math linking would)."""
    from onnxcomp.torch import native

    monkeypatch.setenv("ONNXCOMP_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list(tmp_path.glob("range_kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp
        tiny = np.float32(1e-40)  # subnormal in float32
        assert tiny * np.float32(1.0) > 0 and (torch.tensor(1e-40) * 1.0).item() > 0
    finally:
        native.library.cache_clear()


def test_a_regularizer_pickles_with_the_training_state():
    import pickle

    reg = RangeRegularizer(small_cnn(), kind="dsmm", fold_bn=True, per_channel=True)
    again = pickle.loads(pickle.dumps(reg))
    assert again().item() == reg().item()


def test_dsmm_temperature_grows_while_training():
    model = small_cnn()
    reg = RangeRegularizer(model, kind="dsmm", strength=0.01)
    optimizer = torch.optim.SGD([*model.parameters(), *reg.parameters()], lr=0.1)
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    start = reg.temperatures.detach().clone()
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y) + reg()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.all(reg.temperatures > start)


def test_regularizers_narrow_the_range():
    for kind in KINDS:
        model = small_cnn()
        reg = RangeRegularizer(model, kind=kind, strength=1.0)
        before = [s["range"] for s in reg.stats()]
        optimizer = torch.optim.Adam([*model.parameters(), *reg.parameters()], lr=1e-2)
        for _ in range(50):
            loss = reg()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = [s["range"] for s in reg.stats()]
        assert all(a < b for a, b in zip(after, before)), kind


def test_fold_bn_sees_the_folded_weight():
    model = small_cnn()
    with torch.no_grad():
        model[1].running_var.fill_(4.0)  # BN halves the first conv's outputs
        model[1].weight.fill_(1.0)
    plain = RangeRegularizer(model, kind="linf").stats()[0]["range"]
    folded = RangeRegularizer(model, kind="linf", fold_bn=True).stats()[0]["range"]
    assert folded == pytest.approx(plain / np.sqrt(4.0 + 1e-5), rel=1e-5)


def test_half_precision_and_huge_temperatures_stay_finite():
    model = small_cnn(torch.float16)
    reg = RangeRegularizer(model, kind="dsmm", initial_temperature=1e4)
    value = reg()
    assert torch.isfinite(value) and value.dtype == torch.float32


def test_include_exclude_and_unknown_kind():
    model = small_cnn()
    assert RangeRegularizer(model, include=nn.Linear).names == ["9"]
    assert "0" not in RangeRegularizer(model, exclude=r"^0$").names
    with pytest.raises(ValueError, match="kind 'l3'"):
        RangeRegularizer(model, kind="l3")


def test_export_runs_in_onnxruntime(tmp_path):
    model = small_cnn().eval()
    x = torch.randn(5, 1, 4, 4)
    path = export_onnx(model, x, tmp_path / "cnn.onnx")
    got = outputs(path, {"input": x.numpy()})["output"]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert model.training is False


def test_finetune_runs_the_users_loader_with_the_regularizer():
    """The same fine-tuning with and without the regularizer's pull: it ends narrower with."""
    from onnxcomp.torch import finetune

    torch.manual_seed(1)
    loader = [(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))) for _ in range(10)]
    ranges = {}
    for strength in (1e-12, 1.0):
        model = small_cnn()
        torch.manual_seed(2)
        reg = finetune(model, loader, kind="margin", strength=strength, epochs=3, lr=1e-2)
        assert not model.training and "margin" in reg.stats()[0]
        ranges[strength] = sum(entry["range"] for entry in RangeRegularizer(model, kind="linf").stats())
    assert ranges[1.0] < ranges[1e-12]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU")
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_matches_cpu(kind):
    """On a GPU every kind gives the CPU's loss and gradients (float64, BatchNorm folded)."""
    results = []
    for device in ("cpu", "cuda"):
        model = small_cnn(torch.float64).to(device)
        reg = RangeRegularizer(model, kind=kind, fold_bn=True, per_channel=True).double().to(device)
        value = reg()
        value.backward()
        results.append((value.item(), [p.grad.cpu() for p in [*model.parameters(), *reg.parameters()] if p.grad is not None]))
    (cpu_value, cpu_grads), (gpu_value, gpu_grads) = results
    assert gpu_value == pytest.approx(cpu_value, rel=1e-9) and len(cpu_grads) == len(gpu_grads)
    for a, b in zip(cpu_grads, gpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
