"""Tests for service.retrieval.codes and service.retrieval.ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.retrieval import (
    codes_to_hex,
    hamming_distance,
    hamming_distance_pm1,
    hex_to_codes,
    pack_bits,
    rank,
    sign_codes,
    topk,
    unpack_bits,
)
from service.retrieval.ranking import POPCOUNT_TABLE, stable_topk_indices

BITS = [1, 7, 8, 13, 16, 32, 64, 100]


def random_pm1(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=(n, k))


def brute_hamming(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    out = np.zeros((len(q), len(db)), dtype=np.int64)
    for i in range(len(q)):
        for j in range(len(db)):
            out[i, j] = sum(1 for a, b in zip(q[i], db[j], strict=True) if a != b)
    return out


def brute_rank(dist_row: np.ndarray) -> list[int]:
    return [j for _, j in sorted((int(d), j) for j, d in enumerate(dist_row))]


# ----------------------------------------------------------------------------- sign


def test_sign_codes_numpy_zero_is_plus_one() -> None:
    x = np.array([[-2.5, 0.0, -0.0, 3.0, 1e-30, -1e-30]], dtype=np.float32)
    out = sign_codes(x)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[-1, 1, 1, 1, 1, -1]])


def test_sign_codes_torch_keeps_type_and_dtype() -> None:
    x = torch.tensor([[-0.3, 0.0, 0.7]], dtype=torch.float64)
    out = sign_codes(x)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float64
    assert out.tolist() == [[-1.0, 1.0, 1.0]]
    assert sign_codes(torch.tensor([0, -3, 2])).tolist() == [1, -1, 1]


def test_sign_codes_bool_and_unsigned_become_int8() -> None:
    assert sign_codes(np.array([True, False])).dtype == np.int8
    assert sign_codes(np.array([0, 5], dtype=np.uint8)).tolist() == [1, 1]
    assert sign_codes(torch.tensor([True, False])).dtype == torch.int8


# ----------------------------------------------------------------------------- packing


def test_popcount_table() -> None:
    assert POPCOUNT_TABLE.dtype == np.uint8
    assert [int(v) for v in POPCOUNT_TABLE] == [i.bit_count() for i in range(256)]


def test_pack_known_bytes_big_endian() -> None:
    codes = np.array([[1, -1, -1, -1, -1, -1, -1, 1, 1, 1, -1]])
    packed = pack_bits(codes)
    assert packed.dtype == np.uint8
    assert packed.shape == (1, 2)
    assert packed.tolist() == [[0b10000001, 0b11000000]]
    assert codes_to_hex(codes[0]) == "81c0"


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = random_pm1(rng, 37, bits)
    packed = pack_bits(codes)
    assert packed.shape == (37, (bits + 7) // 8)
    back = unpack_bits(packed, bits)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)
    # {0, 1} and bool inputs pack the same way as ±1.
    np.testing.assert_array_equal(pack_bits((codes > 0).astype(np.int64)), packed)
    np.testing.assert_array_equal(pack_bits(codes > 0), packed)
    np.testing.assert_array_equal(pack_bits(torch.from_numpy(codes)), packed)


@pytest.mark.parametrize("bits", BITS)
def test_hex_round_trip(bits: int) -> None:
    rng = np.random.default_rng(100 + bits)
    for row in random_pm1(rng, 5, bits):
        text = codes_to_hex(row)
        assert len(text) == 2 * ((bits + 7) // 8)
        assert text == text.lower()
        np.testing.assert_array_equal(hex_to_codes(text, bits), row)
        np.testing.assert_array_equal(hex_to_codes(text.upper(), bits), row)


def test_unpack_rejects_wrong_width_and_dtype() -> None:
    with pytest.raises(ValueError):
        unpack_bits(np.zeros((2, 2), dtype=np.uint8), 17)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros((2, 2), dtype=np.int64), 16)
    with pytest.raises(ValueError):
        hex_to_codes("zz", 8)
    with pytest.raises(ValueError):
        hex_to_codes("ff", 16)


# ----------------------------------------------------------------------------- distance


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("use_table", [True, False])
def test_hamming_packed_matches_inner_product_and_brute(bits: int, use_table: bool) -> None:
    rng = np.random.default_rng(bits)
    q = random_pm1(rng, 9, bits)
    db = random_pm1(rng, 23, bits)
    got = hamming_distance(pack_bits(q), pack_bits(db), use_table=use_table, chunk_cells=50)
    assert got.dtype == np.int32
    assert got.shape == (9, 23)
    np.testing.assert_array_equal(got, (bits - q @ db.T) / 2)
    np.testing.assert_array_equal(got, brute_hamming(q, db))
    pm1 = hamming_distance_pm1(q, db)
    assert pm1.dtype == np.int32
    np.testing.assert_array_equal(pm1, got)
    np.testing.assert_array_equal(hamming_distance_pm1(torch.from_numpy(q), db), got)


def test_hamming_chunking_does_not_change_result() -> None:
    rng = np.random.default_rng(7)
    q = pack_bits(random_pm1(rng, 31, 64))
    db = pack_bits(random_pm1(rng, 40, 64))
    full = hamming_distance(q, db)
    for cells in (1, 39, 41, 1000):
        np.testing.assert_array_equal(hamming_distance(q, db, chunk_cells=cells), full)


def test_hamming_rejects_mismatched_width() -> None:
    with pytest.raises(ValueError):
        hamming_distance(np.zeros((1, 2), np.uint8), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError):
        hamming_distance_pm1(np.ones((1, 4)), np.ones((3, 5)))


# ----------------------------------------------------------------------------- ranking


def test_rank_is_stable_by_database_order() -> None:
    dist = np.array([[2, 0, 2, 1, 0, 2], [1, 1, 1, 1, 1, 1]])
    assert rank(dist).tolist() == [[1, 4, 3, 0, 2, 5], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("bits", [4, 8, 13, 64])
def test_rank_and_topk_match_brute_force(bits: int) -> None:
    rng = np.random.default_rng(bits)
    q = random_pm1(rng, 12, bits)
    db = random_pm1(rng, 50, bits)
    db[10:20] = db[0]  # identical codes: many exact ties
    q[0] = db[0]
    dist = brute_hamming(q, db)
    ranked = rank(dist)
    for i in range(len(q)):
        assert ranked[i].tolist() == brute_rank(dist[i])
    qp, dbp = pack_bits(q), pack_bits(db)
    for k in (1, 5, 11, 13, 49, 50, 51, 500):
        idx, dst = topk(qp, dbp, k, chunk_cells=64)
        kk = min(k, 50)
        assert idx.shape == dst.shape == (12, kk)
        np.testing.assert_array_equal(idx, ranked[:, :kk])
        np.testing.assert_array_equal(dst, np.take_along_axis(dist, ranked[:, :kk], 1))


def test_topk_all_equal_distances_returns_database_order() -> None:
    db = np.ones((30, 8))
    q = np.ones((3, 8))
    idx, dst = topk(pack_bits(q), pack_bits(db), 7)
    assert idx.tolist() == [list(range(7))] * 3
    assert dst.tolist() == [[0] * 7] * 3


def test_stable_topk_indices_float_and_negative_distances() -> None:
    rng = np.random.default_rng(3)
    dist_f = rng.integers(0, 3, size=(6, 40)).astype(np.float64) / 2
    dist_i = rng.integers(-3, 3, size=(6, 40))
    dist_i8 = rng.choice(np.array([-128, 0, 127], dtype=np.int8), size=(6, 40))
    dist_i16 = rng.choice(np.array([-30000, 5, 30000], dtype=np.int16), size=(6, 40))
    dist_wide = rng.choice(np.array([-(10**9), 7, 10**6, 10**12]), size=(6, 40))
    dist_u = rng.choice(np.array([3, 70000, 2**40], dtype=np.uint64), size=(6, 40))
    for dist in (dist_f, dist_i, dist_i8, dist_i16, dist_wide, dist_u):
        np.testing.assert_array_equal(rank(dist), np.argsort(dist, axis=1, kind="stable"))
        full = np.argsort(dist, axis=1, kind="stable")
        for k in (1, 4, 10, 39, 40):
            np.testing.assert_array_equal(stable_topk_indices(dist, k), full[:, :k])


def test_topk_rejects_bad_k() -> None:
    with pytest.raises(ValueError):
        topk(np.zeros((1, 1), np.uint8), np.zeros((3, 1), np.uint8), 0)
