"""Measurements: the bench worker (standard library only at import), roofline, reports, fidelity."""
