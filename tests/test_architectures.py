import pytest
import torch

from reduce.hooks import ForwardStopped, Intervention, hooked, start_at_layer
from reduce.sites import Site, resolve_sites
from tests.tiny import CONFIGS, MLP_BY_HAND, tiny_inputs, tiny_model

FAMILIES = sorted(CONFIGS)


def _out(model, inputs):
    out = model.module(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_mlp_equals_hand_computation_and_outputs_unchanged(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    sites = resolve_sites(["blocks.*.mlp.hook_post", "blocks.*.attn.hook_z", "blocks.*.hook_resid_*"], model.n_layers)
    with torch.no_grad():
        plain = _out(model, inputs)
        in_projections, activation = MLP_BY_HAND[family]
        captured = {}
        handles = [
            model.layer(1).get_submodule(name).register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name, o))
            for name in in_projections
        ]
        with hooked(model, record=sites) as recorded:
            hooked_out = _out(model, inputs)
        for handle in handles:
            handle.remove()
    assert torch.equal(plain, hooked_out), "recording must leave outputs bit-identical"
    by_hand = activation(*(captured[name] for name in in_projections))
    # (OPT computes its MLP on flattened (batch * pos) rows; sites are always (batch, pos, units).)
    torch.testing.assert_close(recorded["blocks.1.mlp.hook_post"], by_hand.reshape(recorded["blocks.1.mlp.hook_post"].shape), rtol=1e-5, atol=1e-6)
    assert recorded["blocks.1.mlp.hook_post"].shape[-1] == model.d_mlp
    assert recorded["blocks.0.attn.hook_z"].shape[-1] == model.n_heads * model.d_head
    torch.testing.assert_close(recorded["blocks.0.hook_resid_post"], recorded["blocks.1.hook_resid_pre"])


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_intervention_is_exact_and_zero_ablation_changes_output(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    site = Site.parse("blocks.0.mlp.hook_post")
    with torch.no_grad():
        plain = _out(model, inputs)
        keep_all = Intervention(torch.ones(model.d_mlp), torch.full((model.d_mlp,), 3.0))
        with hooked(model, interventions={site: keep_all}):
            same = _out(model, inputs)
        zero = Intervention(torch.zeros(model.d_mlp), torch.zeros(model.d_mlp))
        with hooked(model, interventions={site: zero}, record=[site]) as recorded:
            ablated = _out(model, inputs)
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, ablated)
    assert torch.count_nonzero(recorded[site.name]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_start_at_layer_equals_full_run(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    site = Site.parse("blocks.1.mlp.hook_post")
    resid = Site.parse("blocks.1.hook_resid_pre")
    ablate = Intervention((torch.arange(model.d_mlp) % 2).float(), torch.zeros(model.d_mlp))
    with torch.no_grad():
        with hooked(model, record=[resid]) as recorded:
            _out(model, inputs)
        with hooked(model, interventions={site: ablate}):
            full = _out(model, inputs)
        with start_at_layer(model, 1, recorded[resid.name]), hooked(model, interventions={site: ablate}):
            resumed = _out(model, inputs)
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_starting_after_the_last_layer_runs_only_what_follows_it(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    leaving = Site.parse(f"blocks.{model.n_layers - 1}.hook_resid_post")
    with torch.no_grad():
        with hooked(model, record=[leaving]) as recorded:
            full = _out(model, inputs)
        with start_at_layer(model, model.n_layers, recorded[leaving.name]):
            resumed = _out(model, inputs)
        moved = recorded[leaving.name] + torch.randn(recorded[leaving.name].shape, generator=torch.Generator().manual_seed(0))
        with start_at_layer(model, model.n_layers, moved):
            perturbed = _out(model, inputs)
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
    assert not torch.allclose(perturbed, full), "the fed stream must reach the output"
    with pytest.raises(ValueError, match="layer must be from 1"):
        with start_at_layer(model, 0, recorded[leaving.name]):
            pass


@pytest.mark.parametrize("family", FAMILIES)
def test_a_forward_stopped_after_its_sites_records_what_a_full_one_does(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    sites = [Site.parse("blocks.0.attn.hook_z"), Site.parse("blocks.1.mlp.hook_post")]
    last_layer_ran = []
    model.layer(1).get_submodule(model.arch.mlp_out).register_forward_hook(lambda *args: last_layer_ran.append(True))
    with torch.no_grad():
        with hooked(model, record=sites) as full:
            _out(model, inputs)
            full = {name: value.clone() for name, value in full.items()}
        del last_layer_ran[:]
        with hooked(model, record=sites, stop_after_record=True) as stopped:
            with pytest.raises(ForwardStopped):
                _out(model, inputs)
    assert not last_layer_ran, "the out-projection after the last recorded site must not run"
    for name in full:
        assert torch.equal(stopped[name], full[name])


def test_each_stopping_forward_waits_for_all_of_its_own_sites():
    model = tiny_model("gpt2")
    inputs = tiny_inputs(model)
    first, second = Site.parse("blocks.0.mlp.hook_post"), Site.parse("blocks.1.mlp.hook_post")
    resid = Site.parse("blocks.1.hook_resid_pre")
    with torch.no_grad():
        with hooked(model, record=[resid]) as clean:
            _out(model, inputs)
        with hooked(model, record=[first, second]) as full:
            _out(model, inputs)
            expected = full[second.name].clone()
        with hooked(model, record=[first, second], stop_after_record=True) as recorded:
            # Resumed at layer 1, the forward never sees blocks.0 and runs to the end ...
            with start_at_layer(model, 1, clean[resid.name] * 2):
                _out(model, inputs)
            # ... and the next one must still wait for its own blocks.1, not stop at blocks.0.
            with pytest.raises(ForwardStopped):
                _out(model, inputs)
    assert torch.equal(recorded[second.name], expected)
