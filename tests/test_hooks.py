import pytest
import torch
from torch import nn

from distill.errors import UserError
from distill.models.hooks import FeatureHooks


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2), nn.Tanh()))


def test_reads_outputs_by_path_without_touching_forward() -> None:
    model = make_model()
    x = torch.randn(5, 4)
    expected_hidden = model[1](model[0](x))
    with FeatureHooks(model, ["1", "2.0"]) as hooks:
        out = model(x)
        assert torch.equal(hooks.features["1"], expected_hidden)
        assert torch.equal(hooks.features["2.0"], model[2][0](expected_hidden))
        assert hooks.features["1"].requires_grad  # student features keep their graph
    assert torch.equal(out, model(x))
    assert not model[1]._forward_hooks  # removed on exit


def test_detach_for_teachers_and_clear() -> None:
    model = make_model()
    hooks = FeatureHooks(model, ["0"], detach=True)
    model(torch.randn(2, 4))
    assert not hooks.features["0"].requires_grad
    hooks.clear()
    assert hooks.features == {}
    hooks.remove()


def test_unknown_path_names_the_nearest() -> None:
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(2, 2))
    with pytest.raises(UserError, match="did you mean 'encoder'"):
        FeatureHooks(model, ["encodr"])


def test_huggingface_style_output_logits() -> None:
    from transformers.modeling_outputs import SequenceClassifierOutput

    from distill.models.adapters import logits_of

    logits = torch.randn(2, 3)
    assert logits_of(SequenceClassifierOutput(logits=logits)) is logits
    assert logits_of((logits, None)) is logits
    with pytest.raises(UserError):
        logits_of("nope")
