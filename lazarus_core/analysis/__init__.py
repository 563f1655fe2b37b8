"""Analyses of expert weights (structure, spectra) built on lazarus_core.ops and lazarus_core.models."""
