"""Experiments: a YAML list of routing analyses run over one trace, with results, figures and a resumable index."""

from lazarus_core.experiment.runner import (
    AnalysisStep,
    ExperimentConfig,
    ExperimentReport,
    StepResult,
    experiment_status,
    load_config,
    run_experiment,
)

__all__ = ["AnalysisStep", "ExperimentConfig", "ExperimentReport", "StepResult", "experiment_status", "load_config",
           "run_experiment"]
