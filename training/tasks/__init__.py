"""Built-in evaluation tasks (`suite`) and their exact-match scoring (`scoring`)."""

from training.tasks.scoring import TaskScore, exact_match, normalize_answer, score_predictions
from training.tasks.suite import (
    MAX_NUMBER,
    SPLITS,
    TASKS,
    GeneratedDocuments,
    Task,
    TaskStream,
    generate_task,
    iter_documents,
    split_of,
    write_jsonl,
)

__all__ = [
    "MAX_NUMBER",
    "SPLITS",
    "TASKS",
    "GeneratedDocuments",
    "Task",
    "TaskScore",
    "TaskStream",
    "exact_match",
    "generate_task",
    "iter_documents",
    "normalize_answer",
    "score_predictions",
    "split_of",
    "write_jsonl",
]
