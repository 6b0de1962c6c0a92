"""Tools around EnECG models that never ship to the Hub: the `enecg` command line (`cli`), conversion of upstream
expert checkpoints (`convert`), saliency explanations and plots (`explain`), the quickstart (`quickstart`) and the
shipped model's build (`build_model`). The model card and the serving files of a model folder are written by
`enecg_hf.training` (`model_card`, `serving_export`), which these tools sit above.

The package root holds exactly the code a saved model folder carries for `trust_remote_code`.
"""
