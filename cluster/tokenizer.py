"""Loading a model's tokenizer for the router (detokenizing, stop strings, text prompts)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def load_tokenizer(
    model_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> Any | None:
    """The model's tokenizer, or None when the model ships without one (token-id prompts only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            model_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer for %s (%s); prompts must be token ids", model_path, exc)
        return None
