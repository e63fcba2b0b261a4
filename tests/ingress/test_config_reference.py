"""The configuration explains itself: every AppArgs field has a description, docs/configuration.md is generated
from them and current, and the flat keys of earlier versions still land in their sections."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ingress.args import FLAT_KEYS, AppArgs, reference_markdown

REPO = Path(__file__).resolve().parents[2]


def test_every_field_is_described():
    for name, f in AppArgs.model_fields.items():
        assert (f.annotation.__doc__ or "").strip(), name
        for field, info in f.annotation.model_fields.items():
            assert info.description and len(info.description) > 10, f"{name}.{field} has no description"


def test_reference_is_current():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == reference_markdown(), "docs/configuration.md is stale: python -m ingress.args --markdown > docs/configuration.md"


def test_flat_and_nested_keys_mean_the_same():
    flat = AppArgs(model="models/demo-lm", model_dtype="bfloat16", sae_sets=["res-demo"], token_limit=64, secret="s",
                   max_loaded_saes=3, capture_batch_size=8, device="cpu")
    nested = AppArgs(model={"name": "models/demo-lm", "dtype": "bfloat16"}, saes={"sets": ["res-demo"], "max_loaded": 3},
                     limits={"token_limit": 64}, auth={"secret": "s"}, batching={"capture_batch_size": 8},
                     resources={"device": "cpu"})
    assert flat == nested
    assert AppArgs.model_validate(nested.model_dump()) == nested
    assert set(FLAT_KEYS.values()) == {(s, k) for s, f in AppArgs.model_fields.items() for k in f.annotation.model_fields}


@pytest.mark.parametrize("bad", [{"token_limt": 64}, {"limits": {"token_limt": 64}},
                                 {"token_limit": 64, "limits": {"token_limit": 32}}])
def test_unknown_or_doubled_keys_are_errors(bad):
    with pytest.raises(ValidationError):
        AppArgs.model_validate(bad)
