"""`python -m enecg_hf.features`: fill the record-level feature store ahead of training (see `cli`)."""

from .cli import main


if __name__ == "__main__":
    main()
