"""H&E colour through Beer–Lambert: stain amounts -> optical density -> RGB.

Each pixel carries an amount of hematoxylin (nuclei, blue-purple) and eosin (cytoplasm, stroma,
red blood cells, pink). Optical density is their sum along the stains' OD vectors, and transmitted
light is ``background * 10 ** -OD``. Every slide draws its own stain vectors, strengths and glass
tint around a reference, as staining and scanning differ from slide to slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Reference OD vectors (R, G, B) of hematoxylin and eosin, as Macenko's stain normalisation uses.
HEMATOXYLIN_OD = np.array([0.5626, 0.7201, 0.4062])
EOSIN_OD = np.array([0.2159, 0.8012, 0.5581])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Stain:
    """One slide's staining: OD vectors, stain strengths and the colour of the glass."""

    hematoxylin: np.ndarray
    eosin: np.ndarray
    hematoxylin_strength: float
    eosin_strength: float
    background: np.ndarray

    @classmethod
    def reference(cls) -> "Stain":
        return cls(HEMATOXYLIN_OD, EOSIN_OD, 1.0, 1.0, np.array([244.0, 242.0, 246.0]))

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Stain":
        """A slide's stain, varied around the reference (hue, strength, glass tint)."""
        return cls(
            hematoxylin=_unit(HEMATOXYLIN_OD + rng.normal(0, 0.05, 3)),
            eosin=_unit(EOSIN_OD + rng.normal(0, 0.06, 3)),
            hematoxylin_strength=float(rng.uniform(0.8, 1.2)),
            eosin_strength=float(rng.uniform(0.75, 1.25)),
            background=np.clip(np.array([244.0, 242.0, 246.0]) + rng.normal(0, 3, 3), 225, 255),
        )

    def separate(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stain amounts (hematoxylin, eosin) of an RGB image: colour deconvolution, the inverse of
        :meth:`to_rgb` up to rounding (least squares over the three channels)."""
        light = np.maximum(np.asarray(rgb, dtype=np.float32), 1.0) / self.background.astype(np.float32)
        od = -np.log10(np.minimum(light, 1.0))
        basis = np.stack([self.hematoxylin * self.hematoxylin_strength, self.eosin * self.eosin_strength], axis=1)
        amounts = od.reshape(-1, 3) @ np.linalg.pinv(basis).T.astype(np.float32)
        amounts = amounts.reshape(od.shape[:-1] + (2,))
        return amounts[..., 0], amounts[..., 1]

    def to_rgb(self, hematoxylin: np.ndarray, eosin: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) from stain amounts (H, W)."""
        h = hematoxylin * np.float32(self.hematoxylin_strength * np.log(10))
        e = eosin * np.float32(self.eosin_strength * np.log(10))
        rgb = np.empty(hematoxylin.shape + (3,), dtype=np.uint8)
        for channel in range(3):
            od = h * np.float32(self.hematoxylin[channel]) + e * np.float32(self.eosin[channel])
            light = np.exp(-od) * np.float32(self.background[channel])
            rgb[..., channel] = np.clip(light + 0.5, 0, 255)
        return rgb
