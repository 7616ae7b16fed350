"""The cost model's projection (``python -m mllmrec.llm.cost``) against a hand computation."""

from __future__ import annotations

import argparse
import math

import numpy as np

from mllmrec.llm import cost


def test_projection_matches_the_hand_computation():
    measured = {"item_text_tokens": {"mean": 100.0}, "reason_template_tokens": 50, "max_prompt_tokens": 1000,
                "describe_prompt_tokens": 60}
    a = argparse.Namespace(image_description_tokens=20.0, gen_tokens=100.0, image_tokens=256, prefill_per_gpu=1000.0,
                           decode_per_gpu=100.0, shard_hours=0.5)
    lengths = np.array([0, 2, 5, 20])  # user 0 has no history: no request; user 3 is capped at 1000 tokens
    row = cost.project("x", lengths, 10, measured, a)
    per_item = 100 + 20 + 4
    prompts = [50 + 2 * per_item, 50 + 5 * per_item, 1000]
    prompt = sum(prompts) + 10 * (60 + 256)
    gen = (3 + 10) * 100
    hours = (prompt / 1000 + gen / 100) / 3600
    assert row["users"] == 3 and row["items"] == 10
    assert row["prompt_tokens_M"] == round(prompt / 1e6, 1) and row["generated_tokens_M"] == round(gen / 1e6, 1)
    assert row["gpu_hours"] == round(hours, 2) and row["shards"] == max(1, math.ceil(hours / 0.5))
    assert row["user_prompt_tokens"]["max"] == 1000 and row["user_prompt_tokens"]["p50"] == float(np.median(prompts))
