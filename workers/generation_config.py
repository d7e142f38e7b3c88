"""The served model's sampling defaults: what a request that leaves a sampling knob unset runs
with. Read from the checkpoint's generation_config.json, as vLLM's `--generation-config auto`
does, on top of a built-in model's own (`checkpoints.BUILTIN_SAMPLING_DEFAULTS`).
"""

from __future__ import annotations

import logging

from kvray.workers.protocol import NEUTRAL_KNOBS, InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)


def sampling_defaults(
    model_path: str,
    *,
    builtin: dict[str, float],
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """The knobs of `NEUTRAL_KNOBS` that the model's generation config sets (those that differ
    from transformers' own defaults, as vLLM reads them), over the built-in model's `builtin`.
    A value a request could not take is left out with a warning."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(
            model_path, revision=revision or "main", trust_remote_code=trust_remote_code
        )
        given = config.to_diff_dict()
    except OSError:  # the checkpoint has no generation_config.json
        given = {}
    defaults = dict(builtin)
    defaults.update({k: v for k, v in given.items() if k in NEUTRAL_KNOBS and v is not None})
    for name, value in list(defaults.items()):
        try:
            SamplingParams().with_defaults({name: value})  # validated as a request's would be
        except (InvalidParameterError, TypeError) as exc:
            logger.warning("ignoring the model's default %s=%r: %s", name, value, exc)
            del defaults[name]
    return defaults
