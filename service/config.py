"""Settings, read from the environment with the ``HASHAUDIT_`` prefix (or a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """All settings of HashAudit; every field maps to ``HASHAUDIT_<FIELD>``.

    Attributes:
        model_store: folder holding bundle folders.
        default_bundle: bundle used when a request or command names none.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: forward precision of served and audited models: ``auto`` (bf16 autocast
            and channels-last on CUDA, fp32 on CPU), ``fp32`` or ``bf16``. Attacks keep their
            perturbation, projection and uint8 rounding in float32 either way.
        fmnist_dir: folder of the Fashion-MNIST IDX files.
        host / port: where ``hashaudit serve`` listens.
        workers: server processes of ``hashaudit serve`` on that port (``--workers``), each
            with its own copy of the bundles and its own micro-batcher; more than one needs
            ``redis_url`` (audits run on Redis workers) and no ``model_uploads``.
        torch_threads: CPU threads torch uses inside each server process; 0 (default) =
            ``OMP_NUM_THREADS`` if set, else ``(cores - 1) // workers``, at least 1: a core
            is left to HTTP, and processes do not oversubscribe the cores (threads that wait
            for a busy core make every forward pass many times slower on a shared machine).
        api_keys: comma-separated keys; when set, every endpoint but ``/health/*`` needs one
            (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``).
        max_batch / max_delay_ms: micro-batcher: the most requests run in one forward pass,
            and how long the first waits for company.
        max_queue: requests waiting for inference before new ones get 503 + Retry-After.
        max_upload_bytes: request body limit (413 above it).
        max_pixels: decoded image limit (413 above it; stops decompression bombs).
        max_top_k: upper bound of ``top_k``.
        attack_seed: seed of random starts in served attacks.
        redis_url: Redis for audit jobs (``redis://host:6379/0``); empty runs audits on a
            thread inside ``hashaudit serve``.
        redis_prefix: prefix of every audit key in Redis.
        max_audit_queries: most queries one audit (or one upload) may hold.
        max_archive_bytes: size limit of ``POST /audit/uploads`` (query archives), as sent
            (compressed).
        max_archive_unpacked_bytes: most bytes an upload's members may inflate to, all
            together (and the most a compressed tar stream may inflate to); counted while
            extracting, 413 past it.
        max_archive_member_bytes: most bytes one archive member may inflate to (413).
        max_archive_members: most entries (files, folders, links) in one archive (413).
        max_list_lines: most lines, blank ones included, in an upload's list file (413).
        max_list_line_bytes: longest line of an upload's list file, in bytes (413).
        chunk_timeout: seconds one chunk job may run before RQ stops it.
        chunk_retries: times a chunk is retried when its worker died.
        worker_heartbeat_s: a running chunk renews its lease this often (lease = 3 beats).
        worker_maintenance_s: how often workers (idle or busy) look for chunks of dead
            workers; a dead worker's chunk is back at the front of the queue within
            ``3 * worker_heartbeat_s + worker_maintenance_s`` seconds (11 s by default).
        shutdown_drain_s: on SIGTERM, ``hashaudit serve`` stops accepting connections and
            lets requests in flight finish for at most this long; those still waiting then
            get 503 + Retry-After, and the process exits. Keep it below the orchestrator's
            grace period (docker-compose ``stop_grace_period`` of the api: 10 s).
        artifact_dir: writable folder where backdoor audits freeze their poisoned bundles
            (``audits/<id>/<bundle>``); share it between workers and the API to download them.
        train_timeout: seconds one training chunk (a backdoor audit's retraining) may run.
        model_uploads: allow ``POST /models`` (import a checkpoint and index a database sent
            over HTTP, for servers whose users cannot reach the disk). Off by default; on, it
            needs ``api_keys`` (the server refuses to start without), a writable model store,
            and ``artifact_dir`` for the uploaded images (``models/<name>/``). The request
            body limit is ``max_archive_bytes`` and the archive limits are those of
            ``POST /audit/uploads``.
        plugins: comma-separated Python modules that ``serve``, ``worker`` and ``audit``
            import at start; each registers audit types of its own
            (``service.jobs.audit_types.register_audit_type``). API and workers need the
            same list.
    """

    model_config = SettingsConfigDict(env_prefix="HASHAUDIT_", env_file=".env", extra="ignore")

    model_store: Path = REPO_ROOT / "model_store"
    default_bundle: str = "fmnist-dpsh-32"
    device: str = "auto"
    precision: str = "auto"
    fmnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    torch_threads: int = Field(0, ge=0, le=1024)
    api_keys: str = ""
    max_batch: int = Field(32, ge=1, le=1024)
    max_delay_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    max_queue: int = Field(512, ge=1)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(4096 * 4096, ge=1)
    max_top_k: int = Field(100, ge=1, le=10_000)
    attack_seed: int = 0
    redis_url: str = ""
    redis_prefix: str = "hashaudit"
    max_audit_queries: int = Field(20_000, ge=1)
    max_archive_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_archive_unpacked_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_archive_member_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_archive_members: int = Field(25_000, ge=2)
    max_list_lines: int = Field(50_000, ge=1)
    max_list_line_bytes: int = Field(4096, ge=64)
    chunk_timeout: int = Field(3600, ge=10)
    chunk_retries: int = Field(3, ge=0, le=100)
    worker_heartbeat_s: float = Field(2.0, gt=0.0)
    worker_maintenance_s: float = Field(5.0, gt=0.0)
    shutdown_drain_s: float = Field(8.0, gt=0.0, le=3600.0)
    artifact_dir: Path = REPO_ROOT / "artifacts"
    train_timeout: int = Field(24 * 3600, ge=10)
    model_uploads: bool = False
    plugins: str = ""

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def plugin_list(self) -> list[str]:
        return [m.strip() for m in self.plugins.split(",") if m.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings`` instead)."""
    return Settings()
