"""Optuna sweeper: asks Optuna for each trial's values, launches the trials through Hydra's
launcher, and tells Optuna the value each run returned (finetune returns the best value of
`early_stopping.metric`).

Search space syntax is Hydra's sweep syntax, from the sweeper's `params` and the command line:
`choice(a,b)` / `a,b` (categorical), `range(1,4)` (integers 1..3, or stepped floats),
`interval(lo,hi)` (uniform float, or int when both ends are ints) and `tag(log, interval(lo,hi))`
(log scale). Any other override is fixed for every trial.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")
DIRECTIONS = ("auto", "maximize", "minimize")


class SweeperConfigError(CompactHydraException):
    """A problem in the sweeper's settings or search space, stated with its fix."""


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        direction: str = "auto",
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: str = "tpe",
        seed: Optional[int] = 0,
        study_name: Optional[str] = "finetune",
        storage: Optional[str] = None,
        params: Optional[Dict[str, Any]] = None,
    ) -> None:
        problems = []
        if direction not in DIRECTIONS:
            problems.append(f"hydra.sweeper.direction={direction!r} is not one of {', '.join(DIRECTIONS)}")
        if not isinstance(n_trials, int) or n_trials < 1:
            problems.append(f"hydra.sweeper.n_trials={n_trials!r} must be a positive integer")
        if not isinstance(n_jobs, int) or n_jobs < 1:
            problems.append(f"hydra.sweeper.n_jobs={n_jobs!r} must be a positive integer")
        if sampler not in SAMPLERS:
            problems.append(f"hydra.sweeper.sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")
        if problems:
            raise SweeperConfigError("Invalid Optuna sweeper settings: " + "; ".join(problems) + ".")
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.seed = seed
        self.study_name = study_name
        self.storage = storage
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---------------------------------------------------------------- search space
    def search_space(self, arguments: List[str]) -> tuple[Dict[str, Override], List[str]]:
        """Split the sweeper's `params` and the command-line overrides into the searched
        parameters (key -> parsed sweep) and the overrides fixed for every trial."""
        parser = OverridesParser.create()
        from_params = parser.parse_overrides([f"{key}={value}" for key, value in self.params.items()])
        from_cli = parser.parse_overrides(arguments)
        # One override per key; the command line comes last, so it wins over params.
        by_key = {override.get_key_element(): override for override in from_params + from_cli}
        searched = {key: override for key, override in by_key.items() if override.is_sweep_override()}
        fixed = [override.input_line for override in by_key.values() if not override.is_sweep_override()]
        if not searched:
            raise SweeperConfigError(
                "The Optuna sweeper has nothing to search: give at least one sweep override, e.g. "
                "`train.lr='tag(log,interval(1e-5,1e-3))'` or `train.batch_size=8,16,32`, on the "
                "command line or under hydra.sweeper.params."
            )
        return searched, fixed

    @staticmethod
    def suggest(trial: Any, key: str, override: Override) -> Any:
        sweep = override.value()
        if isinstance(sweep, ChoiceSweep):
            choices = [Override._convert_value(v) for v in sweep.list]
            if any(isinstance(c, (list, dict)) for c in choices):
                raise SweeperConfigError(
                    f"{key}: Optuna can only choose among plain values (numbers, strings, booleans), "
                    f"not lists or dicts; got {choices}."
                )
            return trial.suggest_categorical(key, choices)
        if isinstance(sweep, RangeSweep):
            values = list(sweep.range())
            if not values:
                raise SweeperConfigError(f"{key}: {override.get_value_element_as_str()} is an empty range.")
            if all(isinstance(v, int) for v in values) and sweep.step > 0:
                return trial.suggest_int(key, values[0], values[-1], step=int(sweep.step))
            return trial.suggest_categorical(key, values)
        if isinstance(sweep, IntervalSweep):
            log_scale = "log" in sweep.tags
            low, high = sweep.start, sweep.end
            if log_scale and low <= 0:
                raise SweeperConfigError(f"{key}: a log-scale interval needs a positive lower end, got {low}.")
            if isinstance(low, int) and isinstance(high, int):
                return trial.suggest_int(key, low, high, log=log_scale)
            return trial.suggest_float(key, float(low), float(high), log=log_scale)
        raise SweeperConfigError(f"{key}: {override.get_value_element_as_str()} is not a sweep Optuna can sample.")

    # ---------------------------------------------------------------- the sweep
    def resolve_direction(self) -> str:
        if self.direction != "auto":
            return self.direction
        mode = str(OmegaConf.select(self.config, "early_stopping.mode", default="max"))
        return "minimize" if mode.endswith("min") else "maximize"

    def sweep(self, arguments: List[str]) -> Any:
        try:
            import optuna
        except ImportError as err:
            raise SweeperConfigError(
                "hydra/sweeper=optuna needs the optuna package: pip install 'finetune[sweep]' "
                "(or pip install optuna)."
            ) from err
        from hydra.core.utils import JobStatus

        assert self.config is not None and self.launcher is not None
        searched, fixed = self.search_space(arguments)
        direction = self.resolve_direction()
        sampler_cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[self.sampler]
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=sampler_cls(seed=self.seed),
            direction=direction,
            load_if_exists=True,
        )
        metric = OmegaConf.select(self.config, "early_stopping.metric", default="objective")
        log.info("Optuna study %r: %s %s over %s, %d trials", self.study_name, direction, metric,
                 ", ".join(searched), self.n_trials)

        remaining = self.n_trials
        while remaining > 0:
            batch = min(self.n_jobs, remaining)
            trials = [study.ask() for _ in range(batch)]
            overrides = []
            for trial in trials:
                values = {key: self.suggest(trial, key, sweep) for key, sweep in searched.items()}
                overrides.append(tuple(fixed + [f"{key}={value}" for key, value in values.items()]))
            self.validate_batch_is_legal(overrides)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                value = ret.return_value if ret.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, float(value))
                else:
                    log.warning("trial %d failed or returned no %s; Optuna records it as failed", trial.number, metric)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            remaining -= batch

        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not completed:
            raise SweeperConfigError(
                f"Every Optuna trial failed or produced no {metric}; see the trial logs under "
                f"{self.config.hydra.sweep.dir}."
            )
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "direction": direction,
            "metric": metric,
            "best_value": study.best_value,
            "best_params": study.best_params,
            "n_trials": len(study.trials),
            "n_completed": len(completed),
        }
        out = Path(self.config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), out / "optimization_results.yaml")
        log.info("Best %s %.6g with %s", metric, study.best_value, study.best_params)
        return results
