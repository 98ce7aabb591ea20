"""histosynth: synthetic renal histology on command.

Cut whole slide images and label masks into captioned patches, train a text-conditioned latent
diffusion model, generate patches and whole synthetic slides, and measure what the synthetic data
is worth.
"""

__version__ = "0.1.0"
