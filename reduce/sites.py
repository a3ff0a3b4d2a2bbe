"""Site names, in the TransformerLens style users already know, resolved to hook points.

=================================  =========================================  ===============
name                               what is recorded                           unit dims
=================================  =========================================  ===============
``blocks.{l}.mlp.hook_post``       input of the MLP out-projection (MLP        ``unit``
                                   neurons; for gated MLPs, act(gate) * up)
``blocks.{l}.attn.hook_z``         input of the attention out-projection       ``head, d_head``
                                   (attention pre-out units, per head)
``blocks.{l}.hook_resid_pre``      residual stream entering block l            ``d_model``
``blocks.{l}.hook_resid_post``     residual stream leaving block l             ``d_model``
=================================  =========================================  ===============

Patterns use shell globs: ``blocks.*.mlp.hook_post``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from .errors import ReduceError

_SITE = re.compile(r"^blocks\.(\d+)\.(mlp\.hook_post|attn\.hook_z|hook_resid_pre|hook_resid_post)$")
_KIND = {
    "mlp.hook_post": "mlp",
    "attn.hook_z": "attn",
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
}
UNIT_KINDS = ("mlp", "attn")  # the sites whose units can be ablated and fitted


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str
    name: str

    @classmethod
    def parse(cls, name: str, *, source=None, field="site") -> "Site":
        match = _SITE.match(name)
        if not match:
            raise ReduceError(
                f"unknown site {name!r}; expected blocks.L.mlp.hook_post, blocks.L.attn.hook_z, "
                "blocks.L.hook_resid_pre or blocks.L.hook_resid_post",
                file=source,
                field=field,
            )
        return cls(int(match.group(1)), _KIND[match.group(2)], name)

    @property
    def is_unit_site(self) -> bool:
        return self.kind in UNIT_KINDS


def all_site_names(n_layers: int) -> list[str]:
    return [f"blocks.{l}.{suffix}" for l in range(n_layers) for suffix in _KIND]


def resolve_sites(patterns, n_layers: int, *, source=None, field="record.sites") -> list[Site]:
    """Expand glob patterns into the model's sites, in layer order; each pattern must match."""
    names = all_site_names(n_layers)
    chosen: dict[str, Site] = {}
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            Site.parse(pattern, source=source, field=field)  # a malformed name says so first
            raise ReduceError(
                f"site {pattern!r} does not exist in this model (layers 0..{n_layers - 1})",
                file=source,
                field=field,
            )
        for name in matched:
            chosen[name] = Site.parse(name)
    order = {kind: i for i, kind in enumerate(["resid_pre", "attn", "mlp", "resid_post"])}
    return sorted(chosen.values(), key=lambda s: (s.layer, order[s.kind]))

