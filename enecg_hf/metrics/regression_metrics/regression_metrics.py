"""Regression metrics for EnECG: MAE, MSE, RMSE and R², computed with scikit-learn.

A local `evaluate` module (`evaluate.load` of Hub metrics needs the network):

    import evaluate
    metric = evaluate.load("enecg_hf/metrics/regression_metrics")   # or enecg_hf.training.load_metric("regression")
    metric.compute(predictions=[810.0, 950.0], references=[800.0, 1000.0])
    # {'mae': 30.0, 'mse': 1050.0, 'rmse': 32.40..., 'r2': 0.58}
"""

import math

import datasets
import evaluate
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score


_DESCRIPTION = "Mean absolute error, mean squared error, root mean squared error and R² of scalar regression outputs."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted values, in the label's unit.
    references (`list` of `float`): true values, same unit.

Returns:
    `dict` with `mae`, `mse`, `rmse` (the label's unit, squared for `mse`) and `r2` (NaN with fewer than two references
    or constant references, where R² is undefined).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RegressionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#regression-metrics"],
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("regression_metrics: no predictions to score")
        mse = float(mean_squared_error(references, predictions))
        defined = len(references) >= 2 and len(set(references)) > 1
        return {
            "mae": float(mean_absolute_error(references, predictions)),
            "mse": mse,
            "rmse": math.sqrt(mse),
            "r2": float(r2_score(references, predictions)) if defined else float("nan"),
        }
