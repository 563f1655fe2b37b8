"""The spectra engine: one implementation of the expert-delta spectra that moe-type-analyze and the overlay
compressor (moe-overlay-estimate / -compute / -compress) both read.

    linalg.py    float64 Gram, eigensolve, singular values, best rank-r factors, energy rank
    openblas.py  numpy's OpenBLAS for the float64 Gram (dsyrk) and eigensolves up to 1536 rows, per-thread threads
    parallel.py  experts over worker threads (CPU) or batched on a device
    deltas.py    mean expert, deltas from a base, quantisation-noise edges, the overlay base (mean / refined)
    spectrum.py  ProjectionSpectrum (the energy definition, kept_energy, ranks, errors) and projection_spectrum
"""

from lazarus_core.spectra.deltas import (BASE_METHODS, iter_deltas, marchenko_pastur_edge, mean_and_noise, mean_expert,
                                         noise_edges, overlay_base)
from lazarus_core.spectra.linalg import (cumulative_energy, energy_rank, factorize, gram, one_thread, singular_values,
                                         singular_values_reference, spectrum_and_factors, threads_for)
from lazarus_core.spectra.spectrum import ProjectionSpectrum, error_summary, projection_spectrum

__all__ = ["BASE_METHODS", "iter_deltas", "marchenko_pastur_edge", "mean_and_noise", "mean_expert", "noise_edges",
           "overlay_base", "cumulative_energy", "energy_rank", "factorize", "gram", "one_thread", "singular_values",
           "singular_values_reference", "spectrum_and_factors", "threads_for", "ProjectionSpectrum", "error_summary",
           "projection_spectrum"]
