"""A Hydra sweeper that searches hyperparameters with Optuna (`hydra/sweeper=optuna`).

Hydra only instantiates plugins that live in the `hydra_plugins` namespace package, so the
sweeper is here rather than in `finetune/`; its config is `conf/hydra/sweeper/optuna.yaml`.
This module must stay cheap to import: Hydra imports every plugin module on start-up.
"""
