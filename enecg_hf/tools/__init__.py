"""Tools around EnECG models that never ship to the Hub: the `enecg` command line (`cli`), conversion of upstream
expert checkpoints (`convert`), saliency explanations and plots (`explain`), model cards (`model_card`), the quickstart
(`quickstart`) and the serving files of a model folder (`serving_export`).

The package root holds exactly the code a saved model folder carries for `trust_remote_code`.
"""
