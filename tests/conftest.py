import jax
import pytest


jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function that hands out fresh PRNG keys, reproducibly per test."""
    key = jax.random.key(5678)

    def _getkey():
        nonlocal key
        key, sub = jax.random.split(key)
        return sub

    return _getkey


@pytest.fixture
def x64():
    """Runs the test with 64-bit types enabled, without changing the global default."""
    with jax.enable_x64(True):
        yield
