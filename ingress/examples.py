"""Request examples for the interactive docs (``/docs``: "Try it out" starts from these), by endpoint name.

They are written for the bundled demo pack (``models/demo-lm``): prompts in its corpus' own words, which its
tokenizer keeps whole, and the features ``models/demo-lm/features.json`` documents (3-res-demo 919 fires on
animal sentences, 2-res-demo 729 on code). tests/ingress/test_examples.py checks the prompts tokenize into whole
words; tests/service/test_playground.py sends each example to the served app and expects a 200.
"""

from __future__ import annotations

from typing import Optional

MODEL = "demo-lm"
PROMPT = "The lion chased the goat in the forest."
PROMPTS = [PROMPT, "For dinner we had soup with bread."]
ANIMALS = {"source": "3-res-demo", "index": 919}
CODE = {"source": "2-res-demo", "index": 729}
_STEER = {"model": MODEL, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": False, "types": ["STEERED", "DEFAULT"],
          "features": [{"model": MODEL, **CODE, "strength": 25}], "n_completion_tokens": 16, "temperature": 0.5,
          "strength_multiplier": 1, "freq_penalty": 0, "seed": 0}
_ALL = {"model": MODEL, "source_set": "res-demo", "selected_sources": [], "sort_by_token_indexes": [], "ignore_bos": True,
        "num_results": 5}

EXAMPLES: dict[str, dict] = {
    "tokenize": {"model": MODEL, "text": PROMPT},
    "activation_single": {"prompt": PROMPT, "model": MODEL, "source": ANIMALS["source"], "index": str(ANIMALS["index"])},
    "activation_single_batch": {"prompts": PROMPTS, "model": MODEL, "source": ANIMALS["source"],
                                "index": str(ANIMALS["index"])},
    "activation_all": {"prompt": PROMPT, **_ALL},
    "activation_all_batch": {"prompts": PROMPTS, **_ALL},
    "activation_topk_by_token": {"prompt": PROMPT, "model": MODEL, "source": ANIMALS["source"], "top_k": 5, "ignore_bos": True},
    "activation_topk_by_token_batch": {"prompts": PROMPTS, "model": MODEL, "source": ANIMALS["source"], "top_k": 5,
                                       "ignore_bos": True},
    "activation_source": {"prompts": PROMPTS, "model": MODEL, "source": ANIMALS["source"]},
    "util_sae_topk_by_decoder_cossim": {"feature": {"model": MODEL, **CODE}, "model": MODEL, "source": CODE["source"],
                                        "num_results": 5},
    "util_sae_vector": {"model": MODEL, **CODE},
    "steer_completion": {"prompt": "I think", **_STEER},
    "steer_completion_chat": {"prompt": [{"role": "user", "content": "Write a function."}], "steer_special_tokens": False,
                              **_STEER},
    # the legacy routes (with a secret set, add "secret" to the body)
    "legacy_activations_test": {"text": PROMPT, "model": MODEL, "layer": ANIMALS["source"], "index": ANIMALS["index"]},
    "legacy_activations_all": {"text": PROMPT, "model": MODEL, "source_set": "res-demo", "num_results": 5},
    "legacy_top_k_by_decoder_cosine_similarity": {"sae_id": CODE["source"], "feature_id": CODE["index"], "model": MODEL,
                                                  "k": 5},
    "legacy_completion": {"prompt": "I think", "model": MODEL, "features": [{"layer": CODE["source"], "index": CODE["index"],
                                                                           "strength": 25}], "n_completion_tokens": 16},
}


def openapi_extra(endpoint: str) -> Optional[dict]:
    """The ``openapi_extra`` of a route: its request body's example, if it has one."""
    body = EXAMPLES.get(endpoint)
    return {"requestBody": {"content": {"application/json": {"example": body}}}} if body is not None else None
