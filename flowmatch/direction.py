"""Direction of the flow: which distribution sits at t = 0.

``forward``: noise/source at t = 0, data/target at t = 1 (generation).
``backward``: data at t = 0, noise at t = 1 (encoding).
Applied once, before the coupling; couplings, sampling and metrics then speak of (x0, x1).
"""

from __future__ import annotations

DIRECTIONS = ("forward", "backward")


def apply_direction(noise, data, direction: str):
    """Return ``(p0, p1)``: the distributions at t = 0 and t = 1."""
    if direction == "forward":
        return noise, data
    if direction == "backward":
        return data, noise
    raise ValueError(f"direction.name must be one of {list(DIRECTIONS)}, got {direction!r}")
