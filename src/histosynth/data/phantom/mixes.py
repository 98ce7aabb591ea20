"""Class mixes: how much of each renal class a phantom holds.

A mix gives target shares of tissue pixels for the structure classes; the interstitium ("other
kidney tissue") takes whatever they leave. The default follows the mean pixel shares of the thesis'
rat-kidney data (thesis §4.1.3; ``histosynth.schema.RENAL_PIXEL_SHARES``), so that patches with "a
lot of Glomeruli" are as rare as they were there. A *focus* centres one large structure (a
glomerulus, an artery, ...) on a patch so that it covers a chosen share of the patch: that is how a
patch with "a lot of" that class is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Mapping

from ...errors import ConfigError
from ...schema import RENAL_PIXEL_SHARES

ARTERIES, ATROPHIC, TUBULI, GLOMERULI, SCLEROTIC, OTHER, DILATED = 1, 2, 3, 4, 5, 6, 7
#: Class ids a mix sets directly; the interstitium (6) and the glass (0) follow from them.
STRUCTURE_CLASSES = (ARTERIES, ATROPHIC, TUBULI, GLOMERULI, SCLEROTIC, DILATED)
#: Classes drawn as one large structure that can be centred on a patch.
FOCUS_CLASSES = (ARTERIES, GLOMERULI, SCLEROTIC, DILATED)

#: Mean share of glass in a patch that crosses the tissue border (see PatchBorder).
_GLASS_SHARE_AT_BORDER = 0.3


def _tissue_shares(pixel_shares: Mapping[int, float]) -> dict[int, float]:
    """Pixel shares re-expressed as shares of tissue (glass, id 0, left out)."""
    tissue = 1.0 - pixel_shares.get(0, 0.0)
    return {c: pixel_shares.get(c, 0.0) / tissue for c in STRUCTURE_CLASSES}


@dataclass(frozen=True)
class PhantomMix:
    """Target class mix of phantom tissue.

    ``shares`` maps structure class ids (1, 2, 3, 4, 5, 7) to their share of tissue pixels; the
    rest of the tissue is interstitium. ``focus`` names a class (1, 4, 5 or 7) whose structure is
    centred on each patch so that it covers a share of the patch drawn from ``focus_coverage``.
    ``glass`` is the chance that a patch crosses the tissue border (glass then covers about 30 %
    of it). Slides ignore ``focus`` and ``glass``: their glass is what lies around the tissue.
    """

    name: str
    shares: Mapping[int, float]
    focus: int | None = None
    focus_coverage: tuple[float, float] = (0.45, 1.0)
    glass: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shares) - set(STRUCTURE_CLASSES))
        if unknown:
            raise ConfigError(
                f"mix {self.name!r}: shares can be set for classes {list(STRUCTURE_CLASSES)}, not {unknown}"
            )
        if any(v < 0 for v in self.shares.values()) or sum(self.shares.values()) > 0.95:
            raise ConfigError(
                f"mix {self.name!r}: shares must be >= 0 and leave room for interstitium (sum <= 0.95)"
            )
        if self.focus is not None and self.focus not in FOCUS_CLASSES:
            raise ConfigError(f"mix {self.name!r}: focus must be one of {list(FOCUS_CLASSES)}, not {self.focus}")
        low, high = self.focus_coverage
        if not 0 < low <= high <= 1:
            raise ConfigError(f"mix {self.name!r}: focus_coverage must satisfy 0 < low <= high <= 1")
        if not 0 <= self.glass <= 1:
            raise ConfigError(f"mix {self.name!r}: glass must be a probability, got {self.glass}")
        object.__setattr__(self, "shares", MappingProxyType({c: float(self.shares.get(c, 0.0))
                                                             for c in STRUCTURE_CLASSES}))

    def share(self, class_id: int) -> float:
        return self.shares[class_id]


DEFAULT_MIX = PhantomMix(
    name="default",
    shares=_tissue_shares(RENAL_PIXEL_SHARES),
    glass=RENAL_PIXEL_SHARES[0] / _GLASS_SHARE_AT_BORDER,
)


def _focused(name: str, focus: int, coverage: tuple[float, float] = (0.45, 1.0), **shares: float) -> PhantomMix:
    base = dict(DEFAULT_MIX.shares)
    base.update({_CLASS_BY_KEY[k]: v for k, v in shares.items()})
    return PhantomMix(name=name, shares=base, focus=focus, focus_coverage=coverage)


_CLASS_BY_KEY = {"arteries": ARTERIES, "atrophic": ATROPHIC, "tubuli": TUBULI, "glomeruli": GLOMERULI,
                 "sclerotic": SCLEROTIC, "dilated": DILATED}

#: The named mixes the command line offers.
MIXES: dict[str, PhantomMix] = {
    mix.name: mix
    for mix in (
        DEFAULT_MIX,
        _focused("glomeruli-rich", GLOMERULI),
        _focused("sclerotic-rich", SCLEROTIC),
        _focused("arteries-rich", ARTERIES),
        _focused("dilated-rich", DILATED),
        # "Tubuli medium, a lot of Glomeruli": the thesis' generating caption.
        _focused("generating", GLOMERULI, coverage=(0.42, 0.55), tubuli=0.62, dilated=0.04, atrophic=0.01),
        PhantomMix(name="tubuli-rich", shares={**DEFAULT_MIX.shares, TUBULI: 0.66, DILATED: 0.04,
                                               ATROPHIC: 0.01, GLOMERULI: 0.0, SCLEROTIC: 0.0}),
        PhantomMix(name="atrophic-rich", shares={**DEFAULT_MIX.shares, ATROPHIC: 0.22, TUBULI: 0.08,
                                                 DILATED: 0.05}),
    )
}


def resolve_mix(mix: str | PhantomMix | None) -> PhantomMix:
    """A mix from its name (see :data:`MIXES`) or as given; None is the default mix."""
    if mix is None:
        return DEFAULT_MIX
    if isinstance(mix, PhantomMix):
        return mix
    try:
        return MIXES[str(mix).strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown phantom mix {mix!r}; choose one of {', '.join(MIXES)}") from None


def with_shares(mix: PhantomMix, **shares: float) -> PhantomMix:
    """A copy of a mix with some shares changed, keyed by short names (tubuli=0.5, glomeruli=0.1...)."""
    updated = dict(mix.shares)
    for key, value in shares.items():
        if key not in _CLASS_BY_KEY:
            raise ConfigError(f"unknown share {key!r}; use one of {', '.join(_CLASS_BY_KEY)}")
        updated[_CLASS_BY_KEY[key]] = value
    return replace(mix, shares=updated)
