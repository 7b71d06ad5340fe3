"""Secure aggregation: the server-side sum is right and no single upload reveals its update."""

from __future__ import annotations

import numpy as np
import pytest

from fsl.privacy.secagg import SecAggError, flatten, generate_keypair, mask, unflatten, unmask_sum


def _clients(k=4, d=5000, seed=0):
    rng = np.random.default_rng(seed)
    updates = {str(i): rng.normal(0, 0.1, d) for i in range(k)}
    keys = {i: generate_keypair() for i in updates}
    public = {i: pk for i, (_, pk) in keys.items()}
    masked = {i: mask(updates[i], i, keys[i][0], public, b"run/1") for i in updates}
    return updates, keys, public, masked


def test_the_masked_sum_is_the_sum_of_the_updates():
    updates, _, _, masked = _clients()
    total = unmask_sum(list(masked.values()))
    np.testing.assert_allclose(total, sum(updates.values()), atol=4 * 2.0**-24)


def test_no_single_upload_or_partial_sum_reveals_an_update():
    updates, _, _, masked = _clients()
    for i, m in masked.items():
        alone = unmask_sum([m])  # what the server could decode from one stored upload
        corr = np.corrcoef(alone, updates[i])[0, 1]
        assert abs(corr) < 0.05  # uniform masks: no linear trace of the update
        assert np.abs(alone).mean() > 1e9  # values spread over the whole 2^64 ring, not near the update
        # the upload's words look uniform: each byte value about equally frequent. Chi-square with 255
        # degrees of freedom: mean 255, sd 22.6; 450 is 8.6 sd out (a uniform upload never fails it,
        # a float64 update or a zero-heavy one is thousands). (The old bound, min count > 0.7 x mean,
        # sat 3.75 sd out for one of 1,024 counts: it failed about one run in eleven.)
        counts = np.bincount(m.view(np.uint8), minlength=256)
        expected = counts.mean()
        assert ((counts - expected) ** 2 / expected).sum() < 450
        assert counts.min() > 0.5 * expected
    partial = unmask_sum([masked["0"], masked["1"], masked["2"]])  # one participant missing
    assert np.abs(partial - (updates["0"] + updates["1"] + updates["2"])).mean() > 1e9


def test_masks_are_fresh_per_round_and_bound_to_the_pair():
    updates, keys, public, masked = _clients(k=3, d=100)
    again = mask(updates["0"], "0", keys["0"][0], public, b"run/2")
    assert not np.array_equal(again, masked["0"])  # a new round: new masks, differences reveal nothing
    outsider_sk, _ = generate_keypair()
    forged = mask(updates["0"], "0", outsider_sk, public, b"run/1")  # a client without the right key
    assert np.abs(unmask_sum([forged, masked["1"], masked["2"]]) - sum(updates.values())).mean() > 1e9
    with pytest.raises(SecAggError):
        unmask_sum([masked["0"][:10], masked["1"]])


def test_flatten_roundtrip_keeps_shapes_and_dtypes():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)}
    flat, layout = flatten(arrays)
    back = unflatten(flat, layout)
    assert back["w"].dtype == np.float32 and back["n"].dtype == np.int64 and back["w"].shape == (2, 3)
    np.testing.assert_array_equal(back["w"], arrays["w"])
