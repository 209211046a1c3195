"""Evaluation: mislabel detection metrics, LDS and leave-one-out correlation, retraining ground truth.

Everything takes and returns NumPy arrays; the retraining helpers take user functions that
build and train a Keras model.
"""

from vestigia.evaluation.lds import (
    LDSResult,
    correct_class_margin,
    leave_one_out_correlation,
    linear_datamodeling_score,
)
from vestigia.evaluation.mislabel import (
    MislabelReport,
    detection_curve,
    fraction_found,
    mislabel_detection,
    roc_auc,
)
from vestigia.evaluation.retraining import (
    LeaveOneOutResult,
    RetrainingResult,
    leave_one_out_retraining,
    random_subsets,
    retrain_on_subsets,
)
from vestigia.evaluation.stats import average_ranks, pearson, spearman

__all__ = [
    "LDSResult",
    "LeaveOneOutResult",
    "MislabelReport",
    "RetrainingResult",
    "average_ranks",
    "correct_class_margin",
    "detection_curve",
    "fraction_found",
    "leave_one_out_correlation",
    "leave_one_out_retraining",
    "linear_datamodeling_score",
    "mislabel_detection",
    "pearson",
    "random_subsets",
    "retrain_on_subsets",
    "roc_auc",
    "spearman",
]
