"""Smooth bases for the reduced model's filters: a filter over a grid is ``basis @ weights``.

Every basis maps grid points (layer distances, token lags, ...) to a design matrix of shape
``(n_points, n_basis)`` with :meth:`Basis.evaluate`. Bases are small frozen dataclasses, so they
compare by value, copy safely (scikit-learn's ``clone``) and round-trip through
:meth:`Basis.to_dict` / :func:`basis_from_dict` into the attributes of a saved model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


class Basis:
    """A set of functions on grid points; subclasses implement :meth:`evaluate`."""

    def evaluate(self, points) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name, value in fields.items():
            if isinstance(value, Basis):
                fields[name] = value.to_dict()
            elif isinstance(value, tuple):
                fields[name] = list(value)
        return {"kind": type(self).__name__, **fields}


@dataclass(frozen=True)
class LogRaisedCosine(Basis):
    """Raised-cosine bumps equally spaced on a log-stretched axis (Pillow et al. 2008).

    For a point ``x`` of the domain ``[lo, hi]`` the stretched coordinate is
    ``u = log(x − lo + stretch)``. The ``n_basis`` centres ``c_j`` are equally spaced in ``u``
    from ``u(lo)`` to ``u(hi)`` with spacing ``Δ``, and bump ``j`` is

        b_j(x) = ½ (1 + cos(π (u − c_j) / (width · Δ)))   where |u − c_j| < width · Δ, else 0.

    Bumps are narrow near ``lo`` and broad far from it, which suits filters that change quickly
    at short lags or distances and slowly at long ones. ``stretch > 0`` sets how strong that
    effect is: a small stretch gives fine resolution near ``lo``, a large one makes the bumps
    nearly evenly spaced in ``x``. ``width`` is each bump's half-width in centre spacings:
    ``width=1`` makes the bumps a partition of unity (every row sums to one, so a constant filter
    is represented exactly); the default ``width=2`` overlaps more, as Pillow's π/2 phase spacing
    does, giving smoother filters. ``n_basis=1`` is the constant function.

    ``domain=(lo, hi)`` fixes the domain; left as ``None`` it is the range of the points given
    to :meth:`evaluate`, which is right when they are the whole grid (lags ``0..L``, distances
    ``1..D``). Points must be non-negative; for signed lags use :class:`TwoSided`.
    """

    n_basis: int
    stretch: float = 1.0
    width: float = 2.0
    domain: tuple[float, float] | None = None

    def __post_init__(self):
        # Loaded models hand back numpy scalars; plain numbers keep to_dict JSON-serialisable.
        object.__setattr__(self, "n_basis", int(self.n_basis))
        object.__setattr__(self, "stretch", float(self.stretch))
        object.__setattr__(self, "width", float(self.width))
        if self.n_basis < 1:
            raise ValueError(f"n_basis must be at least 1, got {self.n_basis}")
        if self.stretch <= 0 or self.width <= 0:
            raise ValueError(f"stretch and width must be positive, got {self.stretch} and {self.width}")
        if self.domain is not None:
            object.__setattr__(self, "domain", tuple(float(v) for v in self.domain))

    def evaluate(self, points) -> np.ndarray:
        points = np.asarray(points, dtype=float)
        if np.any(points < 0):
            raise ValueError("LogRaisedCosine is defined on non-negative points; use TwoSided for signed lags")
        lo, hi = self.domain if self.domain is not None else (points.min(), points.max())
        if self.n_basis == 1:
            return np.ones((points.size, 1))
        stretched = np.log(np.clip(points, lo, hi) - lo + self.stretch)
        centres = np.linspace(np.log(self.stretch), np.log(hi - lo + self.stretch), self.n_basis)
        spacing = centres[1] - centres[0] if hi > lo else 1.0
        phase = np.clip((stretched[:, None] - centres[None, :]) / (self.width * spacing), -1.0, 1.0)
        return 0.5 * (1.0 + np.cos(np.pi * phase))


@dataclass(frozen=True)
class Identity(Basis):
    """One free weight per grid point (no smoothing)."""

    def evaluate(self, points) -> np.ndarray:
        return np.eye(np.asarray(points).size)


@dataclass(frozen=True)
class Constant(Basis):
    """A single weight shared by every grid point: the filter is flat along this axis."""

    def evaluate(self, points) -> np.ndarray:
        return np.ones((np.asarray(points).size, 1))


@dataclass(frozen=True)
class TwoSided(Basis):
    """Signed points (encoder lags): ``inner`` evaluated on ``|x|``, one copy per side.

    Columns ``[inner on x ≥ 0 | inner on x < 0]``, so earlier and later tokens get separate
    filters with the same smoothness; lag 0 belongs to the non-negative side.
    """

    inner: Basis

    def evaluate(self, points) -> np.ndarray:
        points = np.asarray(points, dtype=float)
        on_magnitude = self.inner.evaluate(np.abs(points))
        ahead = (points >= 0)[:, None]
        return np.concatenate([on_magnitude * ahead, on_magnitude * ~ahead], axis=1)


BASES = {cls.__name__: cls for cls in (LogRaisedCosine, Identity, Constant, TwoSided)}


def basis_from_dict(spec: dict) -> Basis:
    """Inverse of :meth:`Basis.to_dict`."""
    spec = dict(spec)
    cls = BASES[spec.pop("kind")]
    if "inner" in spec:
        spec["inner"] = basis_from_dict(spec["inner"])
    return cls(**spec)


def parse_basis(text: str) -> Basis:
    """A basis from a short command-line spelling.

    ``identity``, ``constant``, ``log-cosine:N`` or ``log-cosine:N:STRETCH``, and
    ``two-sided:`` followed by any of these (``two-sided:log-cosine:8``).
    """
    name, _, rest = text.strip().partition(":")
    try:
        if name == "identity" and not rest:
            return Identity()
        if name == "constant" and not rest:
            return Constant()
        if name == "two-sided" and rest:
            return TwoSided(parse_basis(rest))
        if name == "log-cosine" and rest:
            numbers = rest.split(":")
            if len(numbers) <= 2:
                return LogRaisedCosine(int(numbers[0]), *(float(v) for v in numbers[1:]))
    except ValueError as error:
        raise ValueError(f"bad basis {text!r}: {error}") from None
    raise ValueError(f"bad basis {text!r}: expected identity, constant, log-cosine:N[:STRETCH] or two-sided:<basis>")


def as_basis(value) -> Basis:
    """A basis from a basis, a spelling for :func:`parse_basis`, or a count ``n`` (``LogRaisedCosine(n)``)."""
    if isinstance(value, Basis):
        return value
    if isinstance(value, str):
        return parse_basis(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return LogRaisedCosine(int(value))
    raise ValueError(f"bad basis {value!r}: expected a Basis, a spelling such as 'log-cosine:6', or a number of log raised cosines")
