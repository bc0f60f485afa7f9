"""Training: the recipe (`recipe.train`), where a run lives (`session`), the LightningModule with its losses
and schedule (`module`), freeze/unfreeze (`freeze`), and logging/checkpoint callbacks (`callbacks`)."""

from tahoe_ft.training.recipe import build_hparams, train, training_data

__all__ = ["build_hparams", "train", "training_data"]
