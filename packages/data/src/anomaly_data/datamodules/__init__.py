"""Datamodules over image folders: ``Folder``, ``MvtecAd`` and the built-in ``Demo``."""

from __future__ import annotations

from ._base import ImageFolderDataModule, ValSplitMode
from .demo import Demo
from .folder import Folder
from .mvtec_ad import MvtecAd

__all__ = ["Demo", "Folder", "ImageFolderDataModule", "MvtecAd", "ValSplitMode"]
