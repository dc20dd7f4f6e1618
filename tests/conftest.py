"""Shared fixtures: a tiny real bundle trained once per test session on real Fashion-MNIST."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import REDIS_TEST_URL, TINY_ARGS, TINY_GENERATOR_ARGS, TINY_PATTERN_ARGS, needs_fmnist


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(_test_threads())


# The longest test files (about 30-100 s each on 2 cores), run first: with two xdist workers
# taking whole files, a long file picked up last would run alone at the end.
LONG_FILES = ("jobs/test_audit.py", "jobs/test_backdoor_audit.py", "api/test_hostile_input.py",
              "jobs/test_harden_audit.py", "test_paper_scale.py", "jobs/test_faults.py",
              "store/test_default_bundle.py", "training/test_backdoor.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for i, f in enumerate(LONG_FILES) if path.endswith("tests/" + f)),
                    len(LONG_FILES))

    items.sort(key=rank)  # stable: the order within a file is kept


def _test_threads() -> int:
    """Torch threads of the test process: ``HASHAUDIT_TEST_THREADS``, default 1. The test
    process shares 2 cores with the servers and workers it starts, and two torch threads lose:
    full suite from a fresh clone 453 s with 1 thread, 505 s with 2; the tiny bundle alone took
    491 s with 2 threads on a machine under a load of 5 (37 s idle)."""
    return max(1, int(os.environ.get("HASHAUDIT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one tiny bundle, ``tiny`` (16 bits, 1000 database, 100 queries), with its
    universal patterns, both UntargetedGAN generators, the label-free UAA-GAN, the targeted,
    the saliency and the pattern-residual (universal_gan) generator."""
    needs_fmnist()
    from service.training.train_cli import main

    store = tmp_path_factory.mktemp("store")
    assert main([*TINY_ARGS, "--store", str(store)]) == 0
    assert main([*TINY_PATTERN_ARGS, "--bundle", "tiny", "--store", str(store)]) == 0
    for attack in ("untargeted_gan", "untargeted_gan_plus", "uaa_gan", "targeted_gan",
                   "saliency_gan", "universal_gan"):
        assert main([*TINY_GENERATOR_ARGS, "--bundle", "tiny", "--attack", attack,
                     "--store", str(store)]) == 0
    return store


@pytest.fixture()
def tiny_bundle_copy(tiny_store: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle folder that a test may damage."""
    import shutil

    dst = tmp_path / "tiny"
    shutil.copytree(tiny_store / "tiny", dst)
    return dst


@pytest.fixture(scope="session")
def api_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real ``hashaudit serve`` process on the tiny store (HTTP on a free port)."""
    from helpers import ServerProcess

    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(tiny_store, log, env={"HASHAUDIT_MAX_DELAY_MS": "30"}) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_bundle(tiny_store: Path):
    """The tiny bundle loaded in the test process (to recompute what the server reports)."""
    from service.store import ModelStore

    return ModelStore(tiny_store, "cpu").get("tiny")


@pytest.fixture(scope="module")
def redis_db():
    """The test Redis database, flushed before and after each module that uses it."""
    import redis

    r = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        r.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis not reachable at {REDIS_TEST_URL} ({exc}); `make test` starts one")
    r.flushdb()
    yield r
    r.flushdb()
