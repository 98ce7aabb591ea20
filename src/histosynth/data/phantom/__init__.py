"""The renal phantom: procedural H&E-like kidney tissue with an exact label mask.

A phantom is a test bed and a demo, never real tissue. It draws the structures of the renal schema
— tubuli (rings of epithelial cells with round nuclei around a lumen), dilated tubuli (wide lumen,
flat epithelium), atrophic tubuli (small, thick pale basement membrane), glomeruli (a tuft dense
with nuclei in Bowman's space and capsule), sclerotic glomeruli (pale hyaline, few nuclei),
arteries (thick concentric walls), interstitium ("other kidney tissue") and glass around the
tissue — and colours them through Beer–Lambert H&E stain vectors with texture, blur and per-slide
stain variation, so that no class is given away by a flat colour.

Which pixels carry a structure's label is described in :mod:`.fields`; how much of each class a
phantom holds is a :class:`PhantomMix` (:mod:`.mixes`). Output is deterministic per seed.
"""

from .generate import PhantomSlide, phantom_patch, phantom_patch_mask, phantom_slide
from .mixes import DEFAULT_MIX, MIXES, PhantomMix, resolve_mix, with_shares
from .stain import Stain

__all__ = [
    "DEFAULT_MIX", "MIXES", "PhantomMix", "PhantomSlide", "Stain", "phantom_patch", "phantom_patch_mask",
    "phantom_slide", "resolve_mix", "with_shares",
]
