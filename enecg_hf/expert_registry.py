"""Which class implements each expert type. Add a new expert by importing its class here."""

from __future__ import annotations

from typing import Sequence

from .configuration_enecg import EnECGExpertConfig
from .expert_base import EnECGExpert
from .expert_deepfade import EnECGDeepFadeExpert
from .expert_dlinear import EnECGDLinearExpert
from .expert_ecgfm import EnECGEcgFmExpert
from .expert_features import EnECGFeaturesExpert
from .expert_moment import EnECGMomentExpert
from .expert_openecg import EnECGOpenEcgExpert
from .expert_tempo import EnECGTempoExpert
from .expert_timesnet import EnECGTimesNetExpert


EXPERT_CLASSES: dict[str, type[EnECGExpert]] = {
    cls.expert_type: cls
    for cls in (
        EnECGMomentExpert, EnECGDLinearExpert, EnECGTimesNetExpert, EnECGTempoExpert, EnECGEcgFmExpert,
        EnECGFeaturesExpert, EnECGOpenEcgExpert, EnECGDeepFadeExpert,
    )
}


def build_expert(config: EnECGExpertConfig, lead_names: Sequence[str]) -> EnECGExpert:
    """Instantiate the expert described by `config` with random (or preset-initialised) weights."""
    if config.type not in EXPERT_CLASSES:
        raise ValueError(f"Expert {config.name!r}: type {config.type!r} is not available; known: {sorted(EXPERT_CLASSES)}")
    return EXPERT_CLASSES[config.type](config, lead_names)
