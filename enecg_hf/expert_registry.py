"""Which class implements each expert type. Add a new expert by adding its type to `configuration_enecg.EXPERT_TYPES`
and its import to `expert_class`.

No expert module is loaded until its type is asked for: a config that names MOMENT does not import `momentfm` until a
model is built. The configuration knows the types and nothing of the experts, which import it: no import loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .configuration_enecg import EXPERT_TYPES


if TYPE_CHECKING:
    from .configuration_enecg import EnECGConfig, EnECGExpertConfig
    from .expert_base import EnECGExpert


def expert_class(expert_type: str) -> type[EnECGExpert]:
    """The class implementing `expert_type`; its module (`expert_<type>.py`) is imported on first use."""
    # One spelled-out relative import per type, not an importlib call with a computed name: transformers finds the
    # files a saved model needs by reading these statements, and copies them next to its config.json.
    if expert_type == "moment":
        from .expert_moment import EnECGMomentExpert as implementation
    elif expert_type == "dlinear":
        from .expert_dlinear import EnECGDLinearExpert as implementation
    elif expert_type == "timesnet":
        from .expert_timesnet import EnECGTimesNetExpert as implementation
    elif expert_type == "tempo":
        from .expert_tempo import EnECGTempoExpert as implementation
    elif expert_type == "ecgfm":
        from .expert_ecgfm import EnECGEcgFmExpert as implementation
    elif expert_type == "features":
        from .expert_features import EnECGFeaturesExpert as implementation
    elif expert_type == "openecg":
        from .expert_openecg import EnECGOpenEcgExpert as implementation
    elif expert_type == "deepfade":
        from .expert_deepfade import EnECGDeepFadeExpert as implementation
    elif expert_type == "median_beat":
        from .expert_median_beat import EnECGMedianBeatExpert as implementation
    else:
        raise ValueError(f"Expert type {expert_type!r} is not available; known: {sorted(EXPERT_TYPES)}")
    return implementation


def build_expert(expert_config: EnECGExpertConfig, config: EnECGConfig) -> EnECGExpert:
    """Check `expert_config` against the model's `config` (the expert's own `validate_config`) and instantiate the
    expert with random (or preset-initialised) weights."""
    implementation = expert_class(expert_config.type)
    implementation.validate_config(expert_config, config)
    return implementation(expert_config, list(config.lead_names))


__all__ = ["EXPERT_TYPES", "expert_class", "build_expert"]
