"""What every converter of methods/ (through methods/_layers.py) guarantees: tied weights
are refused rather than silently untied, and a layer that cannot be converted leaves the
model untouched, naming the layer."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops.methods import lowrank_compress, maestro, sltrain, sst, welore

CONVERTERS = {
    "lowrank_compress": lambda model: lowrank_compress.compress(model, rank=2, generator=torch.Generator().manual_seed(0)),
    "welore": lambda model: welore.compress(model, ratio=0.5, generator=torch.Generator().manual_seed(0)),
    "welore.analyze": lambda model: welore.analyze(model, ratio=0.5),
    "sst": lambda model: sst.convert(model),
    "maestro": lambda model: maestro.convert(model, generator=torch.Generator().manual_seed(0)),
    "sltrain": lambda model: sltrain.convert(model, 2, 0.25, generator=torch.Generator().manual_seed(0)),
    "sltrain.svd": lambda model: sltrain.convert(model, 2, 0.25, init="svd", generator=torch.Generator().manual_seed(0)),
}


class _Tied(torch.nn.Module):
    def __init__(self, tie: str):
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        if tie == "linear":
            self.b.weight = self.a.weight
        else:  # an output layer tied to an embedding, as in GPT-2
            self.embed = torch.nn.Embedding(16, 16)
            self.b.weight = self.embed.weight

    def forward(self, x):
        return self.b(self.a(x))


def _types(model):
    return [type(module).__name__ for _, module in model.named_children()]


@pytest.mark.parametrize("tie", ["linear", "embedding"])
@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_tied_weights_are_refused(name, tie):
    """Replacing one holder of a shared Parameter would give the two users different
    weights (two independent factorizations, trained apart): refused, model untouched."""
    model = _Tied(tie)
    before = _types(model)
    with pytest.raises(ValueError, match=r"[ab]\.weight is tied to (a|b|embed)\.weight \(the same Parameter\)"):
        CONVERTERS[name](model)
    assert _types(model) == before and model.b.weight is (model.a.weight if tie == "linear" else model.embed.weight)


@pytest.mark.parametrize("tie", ["linear", "embedding"])
def test_spectra_read_tied_models(tie):
    """Reading spectra unties nothing: WeLore's singular_spectra accepts tied layers (analyze,
    compress's plan, refuses them as compress does)."""
    model = _Tied(tie)
    assert set(welore.singular_spectra(model)) == {"a", "b"}


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_tied_weight_excluded_by_target_modules(name):
    model = _Tied("linear")
    converter = {
        "lowrank_compress": lambda m: lowrank_compress.compress(m, rank=2, target_modules="c"),
        "welore": lambda m: welore.compress(m, ratio=0.5, target_modules="c"),
        "welore.analyze": lambda m: welore.analyze(m, ratio=0.5, target_modules="c"),
        "sst": lambda m: sst.convert(m, target_modules="c"),
        "maestro": lambda m: maestro.convert(m, target_modules="c"),
        "sltrain": lambda m: sltrain.convert(m, 2, 0.25, target_modules="c"),
        "sltrain.svd": lambda m: sltrain.convert(m, 2, 0.25, init="svd", target_modules="c"),
    }[name]
    model.c = torch.nn.Linear(16, 16)
    converter(model)  # the tied pair is not targeted: no error
    assert model.b.weight is model.a.weight


@pytest.mark.parametrize("name", ["sst", "maestro", "sltrain.svd", "lowrank_compress", "welore"])
def test_non_finite_weight_leaves_the_model_untouched(name):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"\b1\b.*(NaN|non-finite)"):
        CONVERTERS[name](model)
    assert _types(model) == ["Linear", "Linear"]


def test_maestro_bad_min_rank_for_a_later_layer_leaves_the_model_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"layer 1: .*min_rank must be in \[1, rank\] = \[1, 4\]; got 8"):
        maestro.convert(model, min_rank=8)
    assert _types(model) == ["Linear", "Linear"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sst_converts_half_precision_models(dtype):
    """SpectralLinear keeps float32 factors for a half-precision layer: the converted model
    takes and returns the model's dtype, and computes the same function."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 8)).to(dtype)
    x = torch.randn(4, 16).to(dtype)
    reference = torch.nn.functional.linear(
        torch.nn.functional.linear(x.float(), model[0].weight.float(), model[0].bias.float()),
        model[1].weight.float(), model[1].bias.float())
    sst.convert(model)
    y = model(x)
    assert y.dtype == dtype
    # Two layers of half-precision rounding of O(1) activations: a few units of the dtype's eps.
    eps = torch.finfo(dtype).eps
    assert (y.float() - reference).abs().max() <= 8 * eps * reference.abs().max()
    y.float().sum().backward()
    assert model[0].U.grad is not None and model[0].U.grad.dtype == torch.float32


def test_sst_numpy_sample_rank():
    np = pytest.importorskip("numpy")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert sst.convert(model, sample_rank=np.float32(0.5))["0"].sample_rank == 4


@pytest.mark.parametrize("name", sorted(set(CONVERTERS) - {"sltrain"}) + ["trp.compress", "trp.truncate_",
                                                                          "from_linear"])
def test_converters_refuse_meta_weights_naming_the_layer(name):
    """A model built on meta (low-memory loading) has no weight values; every converter that
    reads them (an SVD) met torch's "Tensor.item() cannot be called on meta tensors".  Now a
    ValueError names the layer; sltrain's random init reads none and still converts."""
    from lowrank_ops.methods import trp
    from lowrank_ops.nn import SparseLowRankLinear, SpectralLinear

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 8))
    convert = {**CONVERTERS, "trp.compress": lambda model: trp.compress(model),
               "trp.truncate_": lambda model: trp.truncate_(model)}.get(name)
    if convert is not None:
        with pytest.raises(ValueError, match=r"the weight of 0 is on the meta device and has no values"):
            convert(model)
        assert _types(model) == ["Linear", "Linear"]
    else:
        for build in (lambda: SpectralLinear.from_linear(model[0], 4),
                      lambda: maestro.OrderedLowRankLinear.from_linear(model[0]),
                      lambda: SparseLowRankLinear.from_linear(model[0], 4, 0.25)):
            with pytest.raises(ValueError, match=r"linear.weight is on the meta device and has no values"):
                build()
    from lowrank_ops.methods import trp as trp_module

    trp_module.TRPScheduler(model, 0.1, 0.9, 5)  # reads no values: builds on meta (to_empty and load come later)
    sltrain.convert(model, 2, 0.25)
    assert _types(model) == ["SparseLowRankLinear", "SparseLowRankLinear"]
