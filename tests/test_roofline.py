"""The read-only bandwidth kernel behind the decode roofline."""

from __future__ import annotations


def test_read_bandwidth_is_positive_and_in_the_bandwidth_record():
    from tangquant.measure.runner import measure_bandwidth
    from tangquant.measure.roofline import read_bandwidth

    assert read_bandwidth(8 << 20, trials=2) > 0
    bw = measure_bandwidth(1, 16 << 20, 120)
    assert bw["gbs"] == bw["read_gbs"] == max(bw["read_kernels_gbs"].values()) > 0
    assert set(bw["read_kernels_gbs"]) == {"max", "gemv"} and bw["copy_gbs"] > 0 and bw["triad_gbs"] > 0
