"""sparsefast.config.recover: RecoverConfig refuses bad settings when it is made (frozen, validated in
__post_init__)."""

from __future__ import annotations

import pytest

from sparsefast.config.recover import RecoverConfig


def test_bad_config_is_refused_when_made():
    for bad in (dict(dtype="fp16"), dict(lora_r=0), dict(lr=float("nan")), dict(lora_dropout=1.0),
                dict(target_modules=())):
        with pytest.raises(ValueError):
            RecoverConfig(**bad)
