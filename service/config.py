"""Settings, read from the environment with the ``HASHAUDIT_`` prefix (or a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """All settings of HashAudit; every field maps to ``HASHAUDIT_<FIELD>``.

    Attributes:
        model_store: folder holding bundle folders.
        default_bundle: bundle used when a request or command names none.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        fmnist_dir: folder of the Fashion-MNIST IDX files.
    """

    model_config = SettingsConfigDict(env_prefix="HASHAUDIT_", env_file=".env", extra="ignore")

    model_store: Path = REPO_ROOT / "model_store"
    default_bundle: str = "fmnist-dpsh-32"
    device: str = "auto"
    fmnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings`` instead)."""
    return Settings()
