"""What the forgetting monitor shows people: the curves as a figure, and W&B tables, images and artifacts.

matplotlib and wandb are optional and imported only when used; a missing one raises an error that says what to
``pip install``.
"""

from lightning_zenft.reporting.loggers import (
    log_artifact,
    log_image,
    log_scalars,
    log_table,
    require_wandb,
    takes_images,
    takes_tables,
)
from lightning_zenft.reporting.plots import figure_rgb, forgetting_figure, require_matplotlib, save_figure

__all__ = [
    "figure_rgb",
    "forgetting_figure",
    "log_artifact",
    "log_image",
    "log_scalars",
    "log_table",
    "require_matplotlib",
    "require_wandb",
    "save_figure",
    "takes_images",
    "takes_tables",
]
