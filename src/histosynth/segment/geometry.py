"""Sizes of the classic valid-padding U-Net (Ronneberger et al.): which inputs work, what comes out.

Every 3x3 convolution is unpadded and so trims one pixel on each side; each level runs two of them.
With 2x2 max pooling the feature map entering every pooling step must have an even size, or the
encoder's skip connection no longer lines up with the decoder's upsampled map. For the classic depth
of 4 the network loses 184 px (92 px of context on each side): a 572 px input gives a 388 px output.

Valid input sizes are 16 apart (``n = 16 m + 124``, ``m >= 4``). A 256 px image would need 92 px of
mirror padding on each side to be segmented whole, but 440 px is not a valid input; the largest
padding not above 92 px that gives a valid size is 86 px (428 px in, 244 px out), which leaves a
12 px border unsegmented — the set-up of the thesis' caption-accuracy evaluation. The *cover*
geometry pads further, to the next valid size, and crops the output to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

#: Number of poolings of the classic U-Net.
DEPTH = 4
#: Pixels each unpadded 3x3 convolution removes from a feature map's side length.
_CONV_TRIM = 2
#: Unpadded 3x3 convolutions per level.
_CONVS_PER_LEVEL = 2


def _trace_sizes(size: int, depth: int) -> int | None:
    """Output side length for an input side length, or None where the network cannot run."""
    trim = _CONV_TRIM * _CONVS_PER_LEVEL
    for _ in range(depth):
        size -= trim
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= trim
    if size <= 0:
        return None
    for _ in range(depth):
        size = 2 * size - trim
        if size <= 0:
            return None
    return size


def lost_pixels(depth: int = DEPTH) -> int:
    """Side length the network removes: 12 * 2**depth - 8 (184 for depth 4)."""
    return 12 * 2**depth - 8


def context_pixels(depth: int = DEPTH) -> int:
    """Context removed on each side (92 px for depth 4)."""
    return lost_pixels(depth) // 2


def size_step(depth: int = DEPTH) -> int:
    """Distance between consecutive valid sizes, and the shift under which outputs shift exactly."""
    return 2**depth


def is_valid_input_size(size: int, depth: int = DEPTH) -> bool:
    return _trace_sizes(int(size), depth) is not None


def output_size(size: int, depth: int = DEPTH) -> int:
    """Output side length for a valid input side length (``size - 184`` for depth 4)."""
    out = _trace_sizes(int(size), depth)
    if out is None:
        below, above = _valid_neighbours(size, depth)
        raise ConfigError(
            f"{size} px is not a valid input size of a depth-{depth} valid-padding U-Net; "
            f"the nearest valid sizes are {below} and {above} px"
        )
    return out


def smallest_valid_input(at_least: int, depth: int = DEPTH) -> int:
    """The smallest valid input side length >= `at_least`."""
    size = max(int(at_least), 1)
    while not is_valid_input_size(size, depth):
        size += 1
    return size


def largest_valid_input(at_most: int, depth: int = DEPTH) -> int | None:
    """The largest valid input side length <= `at_most`, or None if there is none."""
    for size in range(int(at_most), 0, -1):
        if is_valid_input_size(size, depth):
            return size
    return None


def _valid_neighbours(size: int, depth: int) -> tuple[int | str, int]:
    below = largest_valid_input(size, depth)
    return (below if below is not None else "none", smallest_valid_input(size, depth))


def mirror_padding_for(size: int, max_pad: int | None = None, depth: int = DEPTH) -> int:
    """The largest padding per side, not above `max_pad` (default: the context, 92 px), that makes
    ``size + 2 * pad`` a valid input size — 86 px for a 256 px image."""
    limit = context_pixels(depth) if max_pad is None else int(max_pad)
    for pad in range(limit, -1, -1):
        if is_valid_input_size(size + 2 * pad, depth):
            return pad
    raise ConfigError(
        f"no mirror padding of at most {limit} px makes a {size} px image a valid U-Net input "
        "(valid sizes are even); segment it with full coverage instead"
    )


def cover_input_size(size: int, depth: int = DEPTH) -> int:
    """The smallest valid input whose output covers a whole `size` px image."""
    return smallest_valid_input(size + lost_pixels(depth), depth)


@dataclass(frozen=True)
class AxisPlan:
    """How one image axis is cut into network windows.

    The image is mirror-padded by `pad_before` and `pad_after` pixels. Window k reads padded
    pixels ``[starts[k], starts[k] + window)``; its output pixel 0 is image pixel
    ``starts[k] + context - pad_before``. The result keeps image pixels ``[keep_from, keep_to)``.
    """

    size: int
    window: int
    output: int
    context: int
    starts: tuple[int, ...]
    pad_before: int
    pad_after: int
    keep_from: int
    keep_to: int

    @property
    def result_size(self) -> int:
        return self.keep_to - self.keep_from

    def first_pixel(self, k: int) -> int:
        """Image coordinate of window k's first output pixel."""
        return self.starts[k] + self.context - self.pad_before


def full_cover_plan(size: int, tile: int, depth: int = DEPTH) -> AxisPlan:
    """Windows of at most `tile` px that together predict every pixel of a `size` px axis.

    Windows start at multiples of 2**depth in the padded image, so a valid-padding network gives
    exactly the values one large window would give: tiling leaves no seams.
    """
    step = size_step(depth)
    if output_size(tile, depth) < step:
        smallest = smallest_valid_input(lost_pixels(depth) + step, depth)
        raise ConfigError(f"a {tile} px tile predicts fewer than {step} px; use tiles of at least {smallest} px")
    context = context_pixels(depth)
    window = min(tile, cover_input_size(size, depth))
    out = output_size(window, depth)
    stride = out // step * step
    starts = [0]
    while starts[-1] + out < size:
        starts.append(starts[-1] + stride)
    return AxisPlan(size=size, window=window, output=out, context=context, starts=tuple(starts),
                    pad_before=context, pad_after=starts[-1] + window - size - context,
                    keep_from=0, keep_to=size)


def thesis_plan(size: int, depth: int = DEPTH) -> AxisPlan:
    """One window with the largest mirror padding not above the context (86 px for 256 px);
    the result is the centre ``size - 2 * (92 - pad)`` px (244 of 256)."""
    pad = mirror_padding_for(size, depth=depth)
    context = context_pixels(depth)
    border = context - pad
    window = size + 2 * pad
    return AxisPlan(size=size, window=window, output=output_size(window, depth), context=context,
                    starts=(0,), pad_before=pad, pad_after=pad, keep_from=border, keep_to=size - border)
