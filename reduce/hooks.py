"""One hook mechanism for recording, ablating and resuming mid-network.

Every unit site is the *input* of an out-projection, so a forward pre-hook sees it as one
``(batch, pos, units)`` tensor for every architecture. Ablation is one formula on that tensor,
``x * mask + offset * (1 - mask)``; recording keeps a reference to what downstream layers see
(after any intervention), so recording adds no copy to the forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from .sites import Site


class ForwardStopped(Exception):
    """Raised inside a forward once every recorded site is in, when nothing after them is wanted."""


class Intervention(NamedTuple):
    """Replace a site's units where ``mask`` is 0 by ``offset``; both broadcast to (batch, pos, units)."""

    mask: torch.Tensor
    offset: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(x.dtype)
        return x * mask + self.offset.to(x.dtype) * (1 - mask)


def _site_hook(model, site: Site):
    """(module, 'pre' | 'post') whose input/output is the site's tensor."""
    layer = model.layer(site.layer)
    if site.kind == "mlp":
        return layer.get_submodule(model.arch.mlp_out), "pre"
    if site.kind == "attn":
        return layer.get_submodule(model.arch.attn_out), "pre"
    if site.kind == "resid_pre":
        return layer, "pre"
    return layer, "post"


@contextmanager
def hooked(model, *, record=(), interventions=None, retain_grad=False, stop_after_record=False):
    """Run forwards inside this context to record sites and apply interventions.

    ``record``: iterable of :class:`Site`; the yielded dict maps site name to the latest
    ``(batch, pos, units)`` tensor. ``interventions``: ``{Site: Intervention}``.
    ``retain_grad`` keeps recorded tensors in the graph so ``.grad`` is filled by backward.
    ``stop_after_record``: end each forward as soon as every recorded site is in (the layers
    after the last one, the final norm and the unembedding never run; :func:`reduce.batching.forward`
    then returns None), for callers that want the sites and not the output.
    """
    interventions = dict(interventions or {})
    recorded: dict[str, torch.Tensor] = {}
    wanted = {site.name for site in record}
    arrived: set[str] = set()
    handles = []
    if stop_after_record and wanted:
        # Each forward counts its own arrivals (one that failed or was resumed half-way saw only some).
        handles.append(model.module.register_forward_pre_hook(lambda module, args: arrived.clear()))
    # Some families (OPT) flatten (batch, pos) inside a layer; each layer's input gives the
    # leading shape back, so every site tensor is (batch, pos, units) as documented.
    leading: dict[int, torch.Size] = {}
    for layer in {site.layer for site in {*record, *interventions}}:

        def remember(module, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs["hidden_states"]
            leading[layer] = hidden.shape[:-1]

        handles.append(model.layer(layer).register_forward_pre_hook(remember, with_kwargs=True))
    for site in {*record, *interventions}:
        module, where = _site_hook(model, site)
        intervention = interventions.get(site)
        keep = site.name in wanted

        def transform(x, intervention=intervention, keep=keep, name=site.name, layer=site.layer):
            flat_shape = x.shape if x.ndim == 2 else None
            if flat_shape is not None:
                x = x.view(*leading[layer], -1)
            if intervention is not None:
                x = intervention.apply(x)
            if keep:
                if retain_grad and x.requires_grad:
                    x.retain_grad()
                recorded[name] = x if retain_grad else x.detach()
                if stop_after_record:
                    arrived.add(name)
                    if len(arrived) == len(wanted):
                        raise ForwardStopped
            return x if flat_shape is None else x.reshape(flat_shape)

        if where == "pre":

            def pre(module, args, transform=transform, changes=intervention is not None):
                x = transform(args[0])
                return (x, *args[1:]) if changes else None

            handles.append(module.register_forward_pre_hook(pre))
        else:

            def post(module, args, output, transform=transform, changes=intervention is not None):
                x = transform(output)
                return x if changes else None

            handles.append(module.register_forward_hook(post))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


class _Passthrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at_layer(model, layer: int, resid_pre: torch.Tensor):
    """Skip layers ``< layer`` and feed ``resid_pre`` (cached from an earlier run) into ``layer``
    (``layer == L``: into what follows the last layer, e.g. the final norm and the unembedding).

    Ablations that touch only layers >= ``layer`` give exactly the same result this way as
    a full run, for the cost of ``L - layer`` layers.
    """
    layers = model.layers
    if not 1 <= layer <= len(layers):
        raise ValueError(f"start_at_layer: layer must be from 1 to {len(layers)} (the model's layer count), got {layer}")
    saved = [layers[i] for i in range(layer)]
    for i in range(layer):
        layers[i] = _Passthrough()
    # The skipped layer just below passes the stream on unchanged, whichever layer comes next.
    handle = layers[layer - 1].register_forward_pre_hook(lambda module, args: (resid_pre, *args[1:]))
    try:
        yield
    finally:
        handle.remove()
        for i, original in enumerate(saved):
            layers[i] = original
