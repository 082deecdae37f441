"""The network: shapes, named per-step parameters, classifiers, depth changes."""

from __future__ import annotations

import pytest
import torch

from msnet import MsnetError
from msnet.core import ModelSpec, StageSpec, build_model, count_parameters


@pytest.mark.parametrize("classifier", ["full_field", "gap"])
@pytest.mark.parametrize("stages", [1, 3])
def test_forward_shapes(classifier, stages):
    spec = ModelSpec(3, 7, (16, 16), [StageSpec(4 * 2**i, 2, 1.0) for i in range(stages)], classifier=classifier)
    model = build_model(spec)
    out = model(torch.randn(5, 3, 16, 16))
    assert out.shape == (5, 7)
    final = 16 // 2 ** (stages - 1)
    assert model.features(torch.randn(2, 3, 16, 16)).shape == (2, 4 * 2 ** (stages - 1), final, final)


def test_stage_parameters_are_per_step_tensors():
    spec = ModelSpec(1, 10, (8, 8), [StageSpec(4, 6, 2.0), StageSpec(8, 3, 1.0)])
    model = build_model(spec)
    p0 = model.stage_parameters(0)
    assert p0["K"].shape == (6, 4, 4, 3, 3) and p0["b"].shape == (6, 4)
    assert model.stage_parameters(1)["K"].shape == (3, 8, 8, 3, 3)
    torch.testing.assert_close(model.time_grid(0), torch.arange(6, dtype=torch.float64) * (2.0 / 6))
    assert model.depth() == [6, 3]


def test_set_step_parameters_changes_depth():
    model = build_model(ModelSpec(1, 10, (8, 8), [StageSpec(4, 2, 1.0)]))
    block = model.blocks[0]
    new = {k: torch.cat([v, v]) for k, v in block.step_parameters().items()}
    block.set_step_parameters(new)
    model.sync_spec()
    assert model.depth() == [4] and model.spec.stages[0].layers == 4
    assert block.h == pytest.approx(0.25)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(MsnetError):
        block.set_step_parameters({"K": new["K"]})


def test_full_field_classifier_is_a_midpoint_rule():
    """logits = h^d sum_{c,x} W y + mu with h^d = 1/(H W)."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(1, 3, (6, 4), [StageSpec(2, 1, 1.0)]))
    clf = model.classifier
    y = torch.randn(5, 2, 6, 4)
    W = clf.field_weights
    expected = torch.einsum("bchw,kchw->bk", y, W) / 24 + clf.mu
    torch.testing.assert_close(clf(y), expected)
    clf.set_field_weights(torch.ones(3, 2, 3, 2))
    assert clf.hd == pytest.approx(1 / 6)
    torch.testing.assert_close(clf(torch.ones(1, 2, 3, 2)), torch.full((1, 3), 2.0) + clf.mu)


def test_spec_round_trip_and_validation():
    spec = ModelSpec(1, 10, (28, 28), [StageSpec(8, 4, 1.0), StageSpec(16, 4, 1.0)], classifier="gap")
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert count_parameters(build_model(spec)) > 0
    with pytest.raises(MsnetError, match="integrator"):
        ModelSpec(1, 10, (8, 8), integrator="nope").validate()
    with pytest.raises(MsnetError, match="divisible"):
        ModelSpec(1, 10, (6, 6), [StageSpec(2, 1), StageSpec(2, 1), StageSpec(2, 1)]).validate()


def test_bases_are_abstract_and_facts_are_declared():
    """Abstract-or-final: a residual or integrator missing a method cannot be built; facts are class attributes."""
    from msnet.core import INTEGRATORS, RESIDUALS, AbstractIntegrator, AbstractResidual

    class Half(AbstractResidual):
        name = "half"

        def shapes(self):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        Half(2)
    with pytest.raises(TypeError, match="abstract"):
        AbstractIntegrator()
    for name in RESIDUALS.names():
        cls = RESIDUALS.get(name)
        assert isinstance(cls.parts, tuple) and cls.channel_multiple >= 1 and cls.name == name
    for name in INTEGRATORS.names():
        cls = INTEGRATORS.get(name)
        assert set(cls.parts) <= {p for r in RESIDUALS.names() for p in RESIDUALS.get(r).parts}
    conv = RESIDUALS.get("conv_act")(2)
    with pytest.raises(MsnetError, match="residual 'conv_act' has no part 'y'"):
        conv.part("y", torch.zeros(1, 2, 4, 4), {})


def test_step_hook_and_storing_states_are_scoped():
    """The core's named hooks set what they set only inside their ``with``, also when it raises."""
    model = build_model(ModelSpec(1, 3, (8, 8), [StageSpec(2, 3, 1.0)], integrator="hamiltonian",
                                  residual="hamiltonian", backprop="reversible"))
    seen = []
    euler = build_model(ModelSpec(1, 3, (8, 8), [StageSpec(2, 3, 1.0)]))
    with euler.step_hook(lambda s: lambda j, state: seen.append((s, j, tuple(state.shape)))):
        euler(torch.randn(2, 1, 8, 8))
    assert seen == [(0, j, (2, 2, 8, 8)) for j in range(3)]
    euler(torch.randn(2, 1, 8, 8))
    assert len(seen) == 3 and all(b.probe is None for b in euler.blocks)
    with pytest.raises(RuntimeError):
        with euler.step_hook(lambda s: lambda j, state: seen.append(j)):
            raise RuntimeError("boom")
    assert all(b.probe is None for b in euler.blocks)
    with model.storing_states():
        assert [b.backprop for b in model.blocks] == ["store"]
    assert [b.backprop for b in model.blocks] == ["reversible"]
