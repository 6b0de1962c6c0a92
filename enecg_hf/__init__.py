"""enecg_hf: EnECG, a mixture of frozen ECG/time-series foundation-model experts, as a Hugging Face model.

Importing the package registers `EnECGConfig` and `EnECGModel` with `AutoConfig` / `AutoModel`, so saved folders
load with `AutoModel.from_pretrained(path)` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_enecg import STANDARD_LEAD_NAMES, EnECGConfig, EnECGExpertConfig, EnECGTaskConfig
from .modeling_enecg import EnECGFeatures, EnECGModel, EnECGModelOutput, EnECGTaskEnsemble, load_adapter_base
from .pipeline_enecg import PIPELINE_TASK, EnECGPipeline
from .shipped_models import model_path, shipped_model_names


__version__ = "0.1.0"

AutoConfig.register(EnECGConfig.model_type, EnECGConfig, exist_ok=True)
AutoModel.register(EnECGConfig, EnECGModel, exist_ok=True)
# Saved folders carry `auto_map` and the code files, so they also load with `trust_remote_code=True` anywhere.
EnECGConfig.register_for_auto_class()
EnECGModel.register_for_auto_class("AutoModel")
# `pipeline("ecg-analysis", model=model)` for models whose config names no custom pipeline; saved folders name their
# own copy in `custom_pipelines`, which transformers runs only with trust_remote_code (or pass pipeline_class=).
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=EnECGPipeline, pt_model=AutoModel)

__all__ = [
    "EnECGConfig",
    "EnECGExpertConfig",
    "EnECGTaskConfig",
    "EnECGModel",
    "EnECGTaskEnsemble",
    "EnECGModelOutput",
    "EnECGFeatures",
    "STANDARD_LEAD_NAMES",
    "load_adapter_base",
    "EnECGPipeline",
    "PIPELINE_TASK",
    "model_path",
    "shipped_model_names",
]
