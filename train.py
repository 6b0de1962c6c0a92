#!/usr/bin/env python
"""Train EnECG: `python train.py` (the main job) or `accelerate launch train.py --config ... --dataset ... --label ...`.

All the logic lives in `enecg_hf.training`; see `python train.py --help` and docs/training.md.
"""

from enecg_hf.training import main


if __name__ == "__main__":
    main()
