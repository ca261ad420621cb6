"""Figures of the callbacks: their σ caption, and sending a figure file to the loggers that take images
(WandbLogger: ``wandb.Image``; the others are skipped)."""

from __future__ import annotations

from pathlib import Path


def sigma_caption(pl_module) -> str:
    """'σ=0.05': the interpolant noise of the module being trained ('σ unknown' without an interpolant)."""
    sigma = getattr(getattr(pl_module, "interpolant", None), "sigma", None)
    return "σ unknown" if sigma is None else f"σ={float(sigma):g}"


def log_image(trainer, key: str, path: str | Path) -> None:
    """Log the image file ``path`` under ``key`` at the current step to every logger with a ``log_image`` method."""
    for logger in trainer.loggers:
        if callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
