"""Evaluation protocols for frozen V-MoE features."""

from visionmoe.eval.fewshot import (
    BIG_VISION_LAMBDA,
    VMOE_LAMBDAS,
    FewShotResult,
    fewshot_accuracy,
    fewshot_evaluate,
    fewshot_indices,
    ridge_eigh_solve,
    select_lambda_by_mean_rank,
)

__all__ = [
    "BIG_VISION_LAMBDA",
    "VMOE_LAMBDAS",
    "FewShotResult",
    "fewshot_accuracy",
    "fewshot_evaluate",
    "fewshot_indices",
    "ridge_eigh_solve",
    "select_lambda_by_mean_rank",
]
