"""Tasks: one object per problem type decides everything that differs between them (see
``finetune.tasks.base.Task``). ``get_task(problem_type)`` returns the registered task; a new task
is a ``Task`` subclass registered with ``register``."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from finetune.config import SINGLE_LABEL, FinetuneError, TaskType
from finetune.tasks.base import LABELS, Task
from finetune.tasks.multi_label import MultiLabel
from finetune.tasks.regression import Regression
from finetune.tasks.single_label import SingleLabel
from finetune.tasks.token import TokenClassification

__all__ = ["LABELS", "Task", "TaskError", "all_tasks", "default_task", "detect", "get_task", "model_task", "register", "task_for_choice"]


class TaskError(FinetuneError):
    """A problem type finetune has no task for."""


_REGISTRY: Dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make ``task`` known under its name (Hugging Face's problem_type)."""
    _REGISTRY[task.name] = task
    return task


# The order of detection: word lists claim first; single-label claims what no other task does.
for _task in (TokenClassification(), SingleLabel(), MultiLabel(), Regression()):
    register(_task)


def all_tasks() -> List[Task]:
    return list(_REGISTRY.values())


def get_task(problem_type: Union[str, Task]) -> Task:
    """The task of a problem type (a task passes through).

    Raises TaskError for a problem type no task is registered for."""
    if isinstance(problem_type, Task):
        return problem_type
    try:
        return _REGISTRY[problem_type]
    except (KeyError, TypeError):
        raise TaskError(
            f"unknown task {problem_type!r}: finetune knows the tasks {', '.join(_REGISTRY)} (Hugging Face "
            "problem_type values). A model saved by finetune names its task in finetune.json; set task=... "
            f"({', '.join(t.value for t in TaskType if t != TaskType.auto)} or auto) to choose one."
        ) from None


def default_task() -> Task:
    """The task of a model that names none (a plain sequence classifier)."""
    return _REGISTRY[SINGLE_LABEL]


def task_for_choice(choice: TaskType) -> Optional[Task]:
    """The task that ``task=`` names (None for auto: detected from the labels)."""
    return next((t for t in _REGISTRY.values() if t.choice == choice), None)


def detect(train, cfg) -> Task:
    """The task the train split's label column(s) hold (task=auto); single-label classification
    when the label column is missing (the column check then names it)."""
    return next((t for t in _REGISTRY.values() if t.claims(train, cfg)), default_task())


def model_task(meta_task: Optional[str], config_problem_type: Optional[str], num_labels: int,
               architectures: Sequence[str] = ()) -> Task:  # fmt: skip
    """The task of a saved model: finetune.json's, else its config's problem_type, else the one task
    whose head its config's ``architectures`` name (a Hub NER model's BertForTokenClassification: token
    classification), else what its number of outputs says (one: regression, as transformers reads it)."""
    name = meta_task or config_problem_type
    if name:
        return get_task(name)
    # A sequence-classification head is shared by three tasks and does not decide between them.
    owners = [t for t in _REGISTRY.values() if t.has_head(architectures or ())]
    if len(owners) == 1:
        return owners[0]
    return next(t for t in _REGISTRY.values() if t.default_for_outputs(num_labels))
