import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from winnow.pool import uids as U

hex32 = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(hex32, max_size=60))
def test_round_trip_sorted_with_duplicates(ids):
    ids = ids + ids[:3]   # duplicates mean up-sampling and must survive
    arr = U.hex_to_array(ids)
    assert arr.dtype == np.dtype("u8,u8")
    assert list(U.array_to_hex(arr)) == sorted(ids)
    U.check_subset(arr)


@settings(max_examples=100, deadline=None)
@given(hex32)
def test_fields_are_upper_and_lower_64_bits(uid):
    arr = U.hex_to_array([uid])
    assert int(arr["f0"][0]) == int(uid[:16], 16)
    assert int(arr["f1"][0]) == int(uid[16:], 16)


def test_sort_order_matches_numpy_structured_sort():
    rng = np.random.default_rng(0)
    ids = ["%032x" % int(x) for x in rng.integers(0, 2**62, 200)] + ["f" * 32, "0" * 32]
    a = U.hex_to_array(ids, sort=False)
    b = a.copy()
    b.sort()
    assert (U.hex_to_array(ids) == b).all()


def test_multiplicity_counts_duplicates():
    ids = ["0" * 31 + "1"] * 3 + ["0" * 31 + "2"]
    subset = U.hex_to_array(ids)
    q = U.hex_to_array(["0" * 31 + "1", "0" * 31 + "2", "0" * 31 + "3"], sort=False)
    assert U.multiplicity(subset, q).tolist() == [3, 1, 0]


@pytest.mark.parametrize("bad", ["xyz", "g" * 32, "0" * 31, None])
def test_bad_uids_rejected_clearly(bad):
    with pytest.raises(U.UidError):
        U.hex_to_array(["0" * 32, bad])


def test_unsorted_or_wrong_dtype_subset_rejected(tmp_path):
    arr = U.hex_to_array(["f" * 32, "0" * 32], sort=False)
    with pytest.raises(U.UidError, match="not sorted"):
        U.check_subset(arr)
    with pytest.raises(U.UidError, match="dtype"):
        U.check_subset(np.zeros(3, dtype="u8"))
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(U.UidError):
        U.load(tmp_path / "bad.npy")


def test_save_load_round_trip(tmp_path):
    arr = U.hex_to_array(["%032x" % i for i in range(10)] * 2)
    U.save(tmp_path / "u.npy", arr)
    back = U.load(tmp_path / "u.npy")
    assert (back == arr).all() and len(back) == 20
