"""Test helper: a Lightning Trainer for fast CPU test runs (one CPU device, CSV logs in ``tmp_path``, no
progress bar, model summary or checkpoints, a log line every step)."""

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger


def quiet_trainer(tmp_path, **kw) -> pl.Trainer:
    """``pl.Trainer`` with the defaults above (one epoch); ``kw`` overrides any of them."""
    args = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    args.update(kw)
    return pl.Trainer(**args)
