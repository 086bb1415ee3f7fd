"""Bench runners, one module per runtime, each ``run(spec) -> metrics`` in the bench worker's process.

The engines table (:mod:`tangquant.engines`) names each kind's runner; a runner imports its
runtime at the top and the shared timing from :mod:`tangquant.measure.timing`.
"""
