"""Data: users' datasets in their schemas (`sources`), chat rendering (`chat`), and the DataModule that
regenerates each iteration's synthetic data through the opponent handed to it (`datamodule`)."""

from lowrank_spin.data.datamodule import MATH, SelfPlayDataModule
from lowrank_spin.data.sources import read_pairs

__all__ = ["MATH", "SelfPlayDataModule", "read_pairs"]
