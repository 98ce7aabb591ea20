"""Generation: guided denoising of latents, decoding, jobs, large images and synthetic slides."""

from .sampler import denoise, guided_eps, stack_conditions

__all__ = ["denoise", "guided_eps", "stack_conditions"]
