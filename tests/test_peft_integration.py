"""lowrank_ops as PEFT's LoRA backend: train, save, load into plain PEFT, merge (peft 0.21.2)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import lowrank_ops.integrations.peft as backend  # noqa: E402
from lowrank_ops.integrations.peft import LowrankLoraLinear, use_lowrank_ops  # noqa: E402


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused ops made by the backend (proves the fast path ran)."""
    calls = {"lora_linear": 0, "dora_linear": 0}
    for name in calls:
        op = getattr(backend, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(backend, name, counted)
    return calls


class TinyModel(torch.nn.Module):
    """Two projections and an MLP, named like a transformer block's linear layers."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(24, 32)
        self.v_proj = torch.nn.Linear(24, 32, bias=False)
        self.up_proj = torch.nn.Linear(32, 48)
        self.down_proj = torch.nn.Linear(48, 8)

    def forward(self, x):
        h = torch.tanh(self.q_proj(x)) * self.v_proj(x)
        return self.down_proj(torch.nn.functional.gelu(self.up_proj(h)))


def make_config(use_dora: bool, dropout: float = 0.1):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=use_dora,
                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_train_save_load_into_plain_peft_and_merge(tmp_path, use_dora, fused_calls):
    torch.manual_seed(0)
    base = TinyModel()
    model = peft.get_peft_model(copy.deepcopy(base), use_lowrank_ops(make_config(use_dora)))
    assert isinstance(model.base_model.model.q_proj, LowrankLoraLinear)
    x, target = torch.randn(16, 5, 24), torch.randn(16, 5, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert fused_calls["dora_linear" if use_dora else "lora_linear"] == 5 * 4  # every step, every target
    trained = model.base_model.model.up_proj.lora_B["default"].weight
    assert trained.abs().sum() > 0  # B left its zero init: the fused backward reached it
    model.eval()
    with torch.no_grad():
        ours = model(x)
    model.save_pretrained(tmp_path)

    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # no lowrank_ops mapping
    assert type(plain.base_model.model.q_proj) is peft.tuners.lora.Linear
    plain.eval()
    with torch.no_grad():
        theirs = plain(x)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        merged = plain.merge_and_unload()(x)
        torch.testing.assert_close(merged, theirs, rtol=1e-5, atol=1e-5)

    # Loading back with our backend (the mapping is not saved: register it again).
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path,
                                           config=use_lowrank_ops(peft.LoraConfig.from_pretrained(tmp_path)))
    assert isinstance(again.base_model.model.down_proj, LowrankLoraLinear)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours, rtol=1e-5, atol=1e-5)
        again.merge_adapter()  # PEFT's own merge on our layer
        torch.testing.assert_close(again(x), ours, rtol=1e-5, atol=1e-5)
        again.unmerge_adapter()
        torch.testing.assert_close(again(x), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_same_training_step_as_peft_without_dropout(use_dora):
    torch.manual_seed(1)
    base = TinyModel()
    config = make_config(use_dora, dropout=0.0)
    config.init_lora_weights = False  # random B: the adapter path contributes from step 0
    ours = peft.get_peft_model(copy.deepcopy(base), use_lowrank_ops(copy.deepcopy(config)))
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), make_config(use_dora, dropout=0.0))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 24)
    for model in (ours, theirs):
        model(x).square().sum().backward()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    grads = {name: p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5)


def test_mixed_batch_under_no_grad_runs_one_lora_linear_multi_call(monkeypatch):
    """PEFT's mixed batch (one adapter name per sample, "__base__" for none) for
    inference: one lora_linear_multi call per layer, plain PEFT's outputs; the adapter
    stacks are cached until an adapter changes; with gradients on, PEFT's own path."""
    calls = []
    multi = backend.lora_linear_multi
    monkeypatch.setattr(backend, "lora_linear_multi", lambda *a, **k: calls.append(1) or multi(*a, **k))
    torch.manual_seed(5)
    base = TinyModel()
    configs = {"default": dict(r=4, lora_alpha=8), "other": dict(r=6, lora_alpha=3), "third": dict(r=2, lora_alpha=4)}

    def build(wrap):
        model = None
        for name, kwargs in configs.items():
            config = peft.LoraConfig(lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                     **kwargs)
            config = wrap(config)
            if model is None:
                model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        return model

    ours, theirs = build(use_lowrank_ops), build(lambda config: config)
    torch.manual_seed(6)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(6, 5, 24)
    names = ["other", "default", "__base__", "other", "__base__", "third"]
    with torch.no_grad():
        expected = theirs(x, adapter_names=names)
        torch.testing.assert_close(ours(x, adapter_names=names), expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 4  # one per adapted layer
        layer = ours.base_model.model.q_proj
        stacks = layer._lowrank_stacks[1]
        ours(x, adapter_names=names)
        assert layer._lowrank_stacks[1] is stacks  # nothing changed: no rebuild
        for model in (ours, theirs):
            model.base_model.model.q_proj.lora_B["other"].weight.mul_(-2.0)
        torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names),
                                   rtol=1e-5, atol=1e-5)
        assert layer._lowrank_stacks[1] is not stacks
        # .data rebinding frees the old storage without a version bump: the cache pins the
        # storages it was keyed by, so a new factor cannot reuse the address (the key matched
        # stale stacks now and then, 0.17 off).
        for _ in range(6):
            for model in (ours, theirs):
                for p in (model.base_model.model.q_proj.lora_A["other"].weight,
                          model.base_model.model.q_proj.lora_B["other"].weight):
                    p.data = p.data * 0.5 + 0.1
            torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names),
                                       rtol=1e-5, atol=1e-5)
        assert not isinstance(layer._lowrank_stacks[2][0][0], torch.nn.Parameter)
    calls.clear()
    torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names), rtol=1e-5, atol=1e-5)
    assert not calls  # the adapters require grad: PEFT's path, which autograd can follow
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        ours(x, adapter_names=names[:3])


@pytest.mark.parametrize("setting", ["half_model", "autocast"])
def test_mixed_batch_of_half_models_and_autocast_runs_fused(autocast_case, setting, monkeypatch):
    """PEFT's two usual half-precision mixed batches take the fused path: a half model
    whose adapters PEFT keeps in float32 (``autocast_adapter_dtype=True``, its default),
    and a float32 model under torch.autocast.  Our error against plain PEFT on a float32
    copy (the reference) is at most twice plain PEFT's in the same setting (DESIGN.md's
    half-precision rule); one lora_linear_multi call per layer."""
    device, dtype = autocast_case
    calls = []
    multi = backend.lora_linear_multi
    monkeypatch.setattr(backend, "lora_linear_multi", lambda *a, **k: calls.append(1) or multi(*a, **k))
    torch.manual_seed(7)
    base = TinyModel().to(device)
    if setting == "half_model":  # weights the half model holds exactly, so the reference sees the same ones
        base = base.to(dtype).float()
    configs = {"default": dict(r=4, lora_alpha=8), "other": dict(r=6, lora_alpha=3)}

    def build(wrap, model_dtype):
        model = None
        for name, kwargs in configs.items():
            config = wrap(peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], **kwargs))
            if model is None:
                model = peft.get_peft_model(copy.deepcopy(base).to(model_dtype), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        return model.eval()

    model_dtype = dtype if setting == "half_model" else torch.float32
    models = {"ours": build(use_lowrank_ops, model_dtype), "theirs": build(lambda c: c, model_dtype),
              "reference": build(lambda c: c, torch.float32)}
    torch.manual_seed(8)
    for name, p in models["reference"].named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    state = models["reference"].state_dict()
    for name in ("ours", "theirs"):
        for key, value in models[name].state_dict().items():
            value.copy_(state[key])  # keeps each model's dtypes (float32 adapters on the half model)
    layer = models["ours"].base_model.model.q_proj
    adapter_dtype = layer.lora_A["other"].weight.dtype
    assert adapter_dtype == torch.float32 and layer.base_layer.weight.dtype == model_dtype
    x = torch.randn(6, 5, 24, device=device).to(dtype).float()
    names = ["other", "default", "__base__", "other", "__base__", "default"]
    outputs = {}
    with torch.no_grad():
        for name, model in models.items():
            with torch.autocast(device, dtype=dtype, enabled=setting == "autocast" and name != "reference"):
                outputs[name] = model(x.to(model_dtype) if name != "reference" else x, adapter_names=names)
    assert len(calls) == 4  # one per adapted layer of our model
    assert outputs["ours"].dtype == outputs["theirs"].dtype == dtype
    reference = outputs["reference"].double()
    ours_error = (outputs["ours"].double() - reference).abs().max().item()
    peft_error = (outputs["theirs"].double() - reference).abs().max().item()
    assert ours_error <= 2 * peft_error, f"{setting}: error {ours_error:.3e}, PEFT's {peft_error:.3e}"


def test_falls_back_to_peft_for_mixed_batches_and_disabled_adapters():
    torch.manual_seed(3)
    base = TinyModel()
    model = peft.get_peft_model(copy.deepcopy(base), use_lowrank_ops(make_config(False, dropout=0.0)))
    model.add_adapter("other", use_lowrank_ops(make_config(False, dropout=0.0)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.eval()
    x = torch.randn(4, 24)
    mixed = model(x, adapter_names=["default", "other", "__base__", "default"])
    model.set_adapter("other")
    torch.testing.assert_close(mixed[1], model(x)[1])
    with model.disable_adapter():
        torch.testing.assert_close(mixed[2], model(x)[2])
        torch.testing.assert_close(model(x), base(x))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapters_of_another_dtype_fall_back_to_peft(use_dora, fused_calls):
    """float64 adapters on a float32 model (a dtype the fused ops do not take) run PEFT's
    own path: the same outputs as plain PEFT, no fused call, no error."""
    torch.manual_seed(4)
    base = TinyModel()
    config = make_config(use_dora, dropout=0.0)
    config.init_lora_weights = False
    ours = peft.get_peft_model(copy.deepcopy(base), use_lowrank_ops(copy.deepcopy(config)))
    theirs = peft.get_peft_model(copy.deepcopy(base), make_config(use_dora, dropout=0.0))
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.double()
    x = torch.randn(6, 24)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert fused_calls == {"lora_linear": 0, "dora_linear": 0}


def test_rejects_bad_config():
    with pytest.raises(TypeError, match="config must be a peft.LoraConfig"):
        use_lowrank_ops({"r": 4})
    # target_parameters (PEFT's ParamWrapper) was taken over: "0.bias" adapted the weight.
    with pytest.raises(ValueError, match=r"target_parameters .* is not supported; got \['0.bias'\]"):
        use_lowrank_ops(peft.LoraConfig(r=4, target_modules=[], target_parameters=["0.bias"]))


def _pair(base, config):
    """(plain PEFT, our backend) on copies of ``base`` with the same adapter weights."""
    plain = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    ours = peft.get_peft_model(copy.deepcopy(base), use_lowrank_ops(copy.deepcopy(config)))
    ours.load_state_dict(plain.state_dict())
    return plain.eval(), ours.eval()


def test_hooked_base_layers_take_peft_path(fused_calls):
    """The fused path read W and b directly and never called the base layer: spectral_norm's
    pre-hook (which recomputes W) and the user's forward hooks were skipped (outputs off by
    1.0 and 0.65).  Such layers now run PEFT's path."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.utils.spectral_norm(torch.nn.Linear(16, 32)), torch.nn.ReLU(),
                               torch.nn.Linear(32, 8)).eval()
    plain, ours = _pair(base, peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-6)
        assert fused_calls["lora_linear"] == 1  # the plain layer "2" still fused
        for model in (plain, ours):
            model.base_model.model[2].base_layer.register_forward_hook(lambda module, args, out: out * 0)
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-6)


class _RoundedWeight(torch.Tensor):
    """A weight with its own F.linear (as a torchao quantized weight or a DTensor has)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.detach:  # (nn.Parameter needs detach to keep the type)
            return super().__torch_function__(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():  # other results are plain tensors
            if func is torch.nn.functional.linear and isinstance(args[1], cls):
                x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
                return torch.nn.functional.linear(x, torch.round(weight * 8) / 8, bias)
            return func(*args, **kwargs)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_modules_that_are_not_plain_take_peft_path(use_dora, fused_calls):
    """The fused path read lora_A / lora_B / the dropout's tensors and never called those
    modules: their hooks, a QAT-style nn.Linear subclass or an nn.Dropout subclass were
    ignored (0.8-5.4 off), as was a base weight with its own F.linear (a torchao or DTensor
    weight: 0.16 off).  Such layers run PEFT's path now; the plain ones stay fused."""
    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    class HalvingDropout(torch.nn.Dropout):
        def forward(self, x):
            return 0.5 * x

    changes = {
        "hooked_B": lambda layer: layer.lora_B["default"].register_forward_hook(lambda m, a, out: out * 0),
        "pre_hooked_A": lambda layer: layer.lora_A["default"].register_forward_pre_hook(lambda m, a: (a[0] * 2,)),
        "subclassed_A": lambda layer: setattr(layer.lora_A["default"], "__class__", ScaledLinear),
        "subclassed_dropout": lambda layer: setattr(layer.lora_dropout["default"], "__class__", HalvingDropout),
        "weight_subclass": lambda layer: setattr(layer.base_layer, "weight", torch.nn.Parameter(
            layer.base_layer.weight.detach().as_subclass(_RoundedWeight), requires_grad=False)),
    }
    if use_dora:  # PEFT calls the magnitude module (DoraLinearLayer) for DoRA's output
        changes["hooked_magnitude"] = lambda layer: layer.lora_magnitude_vector["default"].register_forward_hook(
            lambda m, a, out: out * 0.5)
    x = torch.randn(5, 16)
    for label, change in changes.items():
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
        plain, ours = _pair(base, peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False,
                                                  use_dora=use_dora, lora_dropout=0.1))
        for model in (plain, ours):
            change(model.base_model.model[0])
        fused_calls["lora_linear"] = fused_calls["dora_linear"] = 0
        with torch.no_grad():
            torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-6, msg=label)
        assert fused_calls["dora_linear" if use_dora else "lora_linear"] == 1, label  # layer "2" still fused


def test_linear_with_a_tensor_subclass_weight_keeps_peft_layer():
    """A torchao-quantized nn.Linear keeps its class and swaps its weight for a tensor
    subclass: it must get PEFT's own layer (dispatched after the custom modules), not ours."""
    from lowrank_ops.integrations.peft import _ExactLinear

    linear = torch.nn.Linear(8, 6)
    assert isinstance(linear, _ExactLinear)
    linear.weight = torch.nn.Parameter(linear.weight.detach().as_subclass(_RoundedWeight), requires_grad=False)
    assert not isinstance(linear, _ExactLinear)
    model = peft.get_peft_model(torch.nn.Sequential(linear), use_lowrank_ops(peft.LoraConfig(r=2, target_modules=["0"])))
    assert type(model.base_model.model[0]) is peft.tuners.lora.Linear


def test_mixed_model_with_another_adapter_type_takes_peft_path():
    """In a PeftMixedModel a LoRA layer may wrap another adapter's layer (LoHa): the fused
    path read the innermost nn.Linear and skipped the LoHa layer's forward (0.35 off)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8)).double()
    models = []
    for wrap in (lambda config: config, use_lowrank_ops):
        torch.manual_seed(1)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=2, target_modules=["0"], init_weights=False),
                                    adapter_name="ha", mixed=True)
        model.add_adapter("lo", wrap(peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)))
        model.set_adapter(["ha", "lo"])
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(models[1](x), models[0](x), rtol=1e-12, atol=1e-12)


def test_conv1d_target_met_first_leaves_linear_targets_untransposed():
    """PEFT flips the shared config's fan_in_fan_out on a Conv1D target and back for nn.Linear
    ones in its own dispatch, which the backend replaces: a Conv1D met first left the Linear
    transposed (merge_and_unload off by 1.07, DoRA's output by 0.19)."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.proj = Conv1D(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(torch.tanh(self.c_fc(x)))

    torch.manual_seed(1)
    base, x = Model(), torch.randn(5, 16)
    for use_dora in (False, True):
        config = peft.LoraConfig(r=4, target_modules=["c_fc", "proj"], init_lora_weights=False, use_dora=use_dora)
        plain, ours = _pair(base, config)
        assert not ours.base_model.model.proj.fan_in_fan_out
        with warnings.catch_warnings(record=True) as caught:  # PEFT's warning, which the backend dropped
            warnings.simplefilter("always")
            _pair(base, config)
        assert sum("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`" in str(w.message)
                   for w in caught) == 2  # once per model of the pair, as PEFT's dispatch gives it
        with torch.no_grad():
            expected = plain(x)
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-5)


def test_dora_dropout_follows_the_layers_training_flag():
    """PEFT's DoRA drops out only when the layer itself is training; the backend asked the
    dropout module alone (0.245 off PEFT with the layer in eval mode and its dropout in
    train mode, a state set by hand)."""
    torch.manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False, use_dora=True,
                             lora_dropout=0.5)
    plain, ours = _pair(base, config)
    x = torch.randn(6, 16)
    for model in (plain, ours):
        model.train()
        model.base_model.model[0].training = False  # the layer only: its lora_dropout stays in train mode
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-6, atol=1e-6)


def test_full_dropout_and_second_derivatives():
    """lora_dropout = 1.0 in training raised the op's 'dropout_p must be in [0, 1)' (PEFT: the
    adapter term is zero); second derivatives came back None or zero (hessian_trace 0.0):
    they now raise, naming the first-order backward."""
    torch.manual_seed(2)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    plain, ours = _pair(base, peft.LoraConfig(r=4, lora_dropout=1.0, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours.train()(x), plain.train()(x), rtol=1e-6, atol=1e-6)
    _, ours = _pair(base, peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    A = ours.base_model.model[0].lora_A["default"].weight
    with pytest.raises(RuntimeError, match="_LoRALinear: lowrank_ops' fused backward is first-order only"):
        torch.autograd.grad(ours(x).sin().sum(), A, create_graph=True)
    (gradient,) = torch.autograd.grad(ours(x).sin().sum(), A)  # first order as before
    assert torch.isfinite(gradient).all() and gradient.abs().max() > 0


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_under_autocast_matches_peft(autocast_case, use_dora, fused_calls):
    """A few SGD steps under torch.autocast: our backend, plain PEFT (both under autocast)
    and plain PEFT in float32 without autocast (the reference) from the same weights.
    Each step's output: our error at most twice plain PEFT's (DESIGN.md's half-precision
    rule against a float32 reference); every layer took the fused path."""
    device, dtype = autocast_case
    torch.manual_seed(6)
    base = TinyModel().to(device)
    config = make_config(use_dora, dropout=0.0)
    config.init_lora_weights = False  # random B: the adapter path contributes from step 0
    ours = peft.get_peft_model(copy.deepcopy(base), use_lowrank_ops(copy.deepcopy(config)))
    models = {"ours": ours, "theirs": peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config)),
              "reference": peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))}
    for model in models.values():
        model.load_state_dict(ours.state_dict())
        model.train()
    optimizers = {name: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
                  for name, model in models.items()}
    x, target = torch.randn(16, 5, 24, device=device), torch.randn(16, 5, 8, device=device)
    steps = 4
    for step in range(steps):
        outputs = {}
        for name, model in models.items():
            optimizers[name].zero_grad()
            with torch.autocast(device, dtype=dtype, enabled=name != "reference"):
                outputs[name] = model(x)
            torch.nn.functional.mse_loss(outputs[name].float(), target).backward()
            optimizers[name].step()
        assert outputs["ours"].dtype == outputs["theirs"].dtype == dtype
        ours_error = (outputs["ours"].double() - outputs["reference"].double()).abs().max().item()
        peft_error = (outputs["theirs"].double() - outputs["reference"].double()).abs().max().item()
        assert ours_error <= 2 * peft_error, f"step {step}: error {ours_error:.3e}, PEFT's {peft_error:.3e}"
    assert fused_calls["dora_linear" if use_dora else "lora_linear"] == steps * 4  # every step, every target
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.dtype == p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_compiled_hotswap_tensor_scalings(tmp_path, use_dora):
    """PEFT's prepare_model_for_compiled_hotswap makes the scalings 0-d tensors: LoRA runs
    the fused op with the tensor scale (compiled, a hotswap to an adapter of another alpha
    does not recompile); DoRA falls back to PEFT's forward.  Outputs equal plain PEFT's."""
    hotswap = pytest.importorskip("peft.utils.hotswap")
    if not hasattr(hotswap, "prepare_model_for_compiled_hotswap"):
        pytest.skip(f"peft {peft.__version__} has no prepare_model_for_compiled_hotswap")
    torch.manual_seed(7)
    base = TinyModel()
    for name, alpha in (("first", 8), ("second", 24)):
        config = peft.LoraConfig(r=4, lora_alpha=alpha, use_dora=use_dora, init_lora_weights=False,
                                 target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / name)
    x = torch.randn(6, 24)
    with torch.no_grad():
        expected = {name: peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name)(x)
                    for name in ("first", "second")}
    model = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "first", config=use_lowrank_ops(peft.LoraConfig.from_pretrained(tmp_path / "first")))
    hotswap.prepare_model_for_compiled_hotswap(model)
    layer = model.base_model.model.q_proj
    assert isinstance(layer.scaling["default"], torch.Tensor)
    assert layer._fast_adapter(x, (), {}) == (None if use_dora else "default")  # the fused path (LoRA)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected["first"], rtol=1e-5, atol=1e-5)
        if use_dora:
            return
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(x), expected["first"], rtol=1e-5, atol=1e-5)
            hotswap.hotswap_adapter(model, str(tmp_path / "second"), adapter_name="default")
            torch.testing.assert_close(compiled(x), expected["second"], rtol=1e-5, atol=1e-5)


def test_mixed_batch_after_a_fused_optimizer_step():
    """torch's fused=True optimizers (the Hugging Face Trainer's default) update parameters
    without bumping their version counters: the mixed-batch stacks, keyed by versions,
    kept the pre-step adapter (2.4 off).  They now also key on the count of optimizer steps."""
    def run(ours: bool) -> torch.Tensor:
        torch.manual_seed(0)
        wrap = use_lowrank_ops if ours else (lambda config: config)
        model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)),
                                    wrap(peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)))
        model.add_adapter("b", wrap(peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)))
        x, names = torch.randn(4, 16), ["default", "b", "__base__", "b"]
        model.eval()
        with torch.no_grad():
            model(x, adapter_names=names)  # builds the stacks
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
        model(x).pow(2).mean().backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            return model(x, adapter_names=names)

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_bitsandbytes_layers_keep_peft_layers(kind):
    """QLoRA: bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear, and PEFT matches
    custom modules with isinstance before its own dispatchers: they got LowrankLoraLinear,
    and merge_and_unload failed on the quantized weights.  Only nn.Linear itself is ours."""
    bnb = pytest.importorskip("bitsandbytes")
    import warnings

    from peft import get_peft_model

    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "8bit":
            quantized = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        else:
            quantized = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        quantized.load_state_dict(reference.state_dict())
        quantized = quantized.to("cpu")  # (bitsandbytes quantizes on the move)
        quantized(x)  # quantizes the weight
        model = torch.nn.Sequential(quantized)
        setattr(model, f"is_loaded_in_{kind}", True)  # what transformers sets for a bitsandbytes model
        peft_model = get_peft_model(model, use_lowrank_ops(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                      init_lora_weights=False)))
        layer = peft_model.base_model.model[0]
        assert not isinstance(layer, LowrankLoraLinear) and type(layer).__module__ == "peft.tuners.lora.bnb"
        peft_model.merge_and_unload()
    plain = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), use_lowrank_ops(peft.LoraConfig(r=2,
                                                                                                  target_modules=["0"])))
    assert isinstance(plain.base_model.model[0], LowrankLoraLinear)
