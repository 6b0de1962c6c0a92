"""enecg_hf: EnECG, a mixture of frozen ECG/time-series foundation-model experts, as a Hugging Face model."""

__version__ = "0.1.0"
