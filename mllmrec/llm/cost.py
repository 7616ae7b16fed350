"""The LLM stages' cost model (docs/llm.md): tokens per user and per item measured on a dataset with
item text, projected to other datasets (their interaction files) and to a million users, in
GPU-hours and shards at a stated per-GPU throughput::

    python -m mllmrec.llm.cost --data-dir /data/office --project /data/baby /data/sports /data/clothing

Measured (``--data-dir``, tokens counted with ``--tokenizer``, default the ``llm=tiny`` model's):
the reason prompt of every user with a training history, built and fitted as the stage builds it
(``reason.max_prompt_tokens``), without the chat template; the item text D^m_i of every item.
Projected: a user's prompt = template + its training items x (mean item tokens + an image
description + the list's quoting), capped at ``reason.max_prompt_tokens``; an item's describe
prompt = Prompt1 + ``--image-tokens``; every answer ``--gen-tokens`` (the cap is
``llm.sampling.max_tokens``). GPU time = prompt tokens / ``--prefill-per-gpu`` + generated tokens
/ ``--decode-per-gpu`` (both assumptions, stated in docs/llm.md with their sources).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from mllmrec.errors import report_errors

PERCENTILES = (10, 50, 90, 99)


def spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"n": int(v.size), "mean": round(float(v.mean()), 1),
            **{f"p{p}": round(float(np.percentile(v, p)), 1) for p in PERCENTILES}, "max": int(v.max())}


def measure(data_dir: Path, tokenizer: str | None) -> dict:
    """Token counts per user (reason prompt) and per item (item text) on ``data_dir``."""
    from omegaconf import OmegaConf

    from mllmrec.config import CONF_DIR
    from mllmrec.data import load_dataset
    from mllmrec.llm import prompts
    from mllmrec.stages import reason
    from mllmrec.texts import item_texts

    rs = reason.ReasonSettings.from_config(OmegaConf.load(CONF_DIR / "reason" / "default.yaml"))
    data = load_dataset(data_dir.name, str(data_dir))
    texts = item_texts(data)
    requests, counts = reason.build_requests(rs, tokenizer, data, texts)
    counter = prompts.TokenCounter("auto", tokenizer)
    user_tokens = [counter.count(r.text) for r in requests]
    item_tokens = [counter.count(t) for t in texts]
    template = counter.count(prompts.render(rs.prompt, prompts.BEHAVIOUR_SLOT, "[]"))
    describe_prompt = counter.count(OmegaConf.load(CONF_DIR / "describe" / "default.yaml").prompt)
    history = [len(h) for h in data.history(rs.history)]
    return {"dataset": data_dir.name, "users": data.n_users, "items": data.n_items, "tokenizer": counter.name,
            "reason_prompt_tokens_per_user": spread(user_tokens), "item_text_tokens": spread(item_tokens),
            "train_items_per_user": spread(history), "reason_template_tokens": template,
            "describe_prompt_tokens": describe_prompt, "prompts_fitted": counts["prompts_fitted"],
            "max_prompt_tokens": rs.max_prompt_tokens}


def history_lengths(data_dir: Path) -> tuple[np.ndarray, int]:
    """Training items per user (x_label 0) and the number of items, from ``<name>.inter``."""
    import pandas as pd

    df = pd.read_csv(data_dir / f"{data_dir.name}.inter", sep="\t")
    train = df[df["x_label"] == 0]
    lengths = train.groupby("userID").size().reindex(range(df.userID.max() + 1), fill_value=0).to_numpy()
    return lengths, int(df.itemID.max() + 1)


def project(name: str, lengths: np.ndarray, items: int, m: dict, a: argparse.Namespace) -> dict:
    per_item = m["item_text_tokens"]["mean"] + a.image_description_tokens + 4  # "'...', " around each
    users = lengths[lengths > 0]
    user_prompt = np.minimum(m["reason_template_tokens"] + users * per_item, m["max_prompt_tokens"])
    reason_prompt, reason_gen = float(user_prompt.sum()), float(len(users) * a.gen_tokens)
    describe_prompt = float(items * (m["describe_prompt_tokens"] + a.image_tokens))
    describe_gen = float(items * a.gen_tokens)
    prompt, gen = reason_prompt + describe_prompt, reason_gen + describe_gen
    gpu_h = (prompt / a.prefill_per_gpu + gen / a.decode_per_gpu) / 3600
    return {"dataset": name, "users": int(len(users)), "items": items,
            "user_prompt_tokens": spread(user_prompt), "prompt_tokens_M": round(prompt / 1e6, 1),
            "generated_tokens_M": round(gen / 1e6, 1), "gpu_hours": round(gpu_h, 2),
            "shards": max(1, math.ceil(gpu_h / a.shard_hours))}


@report_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mllmrec.llm.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="a dataset with item text (meta-<name>.csv)")
    p.add_argument("--project", type=Path, nargs="*", default=[], help="dataset folders to project to")
    p.add_argument("--users-million", type=float, default=1.0, help="also project to this many million users")
    p.add_argument("--tokenizer", default=None, help="default: the llm=tiny model (SmolLM2's tokenizer)")
    p.add_argument("--gen-tokens", type=float, default=130.0, help="generated tokens per answer (assumed)")
    p.add_argument("--image-tokens", type=int, default=256, help="prompt tokens per image (Gemma 3: 256)")
    p.add_argument("--image-description-tokens", type=float, default=130.0)
    p.add_argument("--prefill-per-gpu", type=float, default=9000.0, help="prompt tokens/s per GPU (assumed)")
    p.add_argument("--decode-per-gpu", type=float, default=5500.0, help="generated tokens/s per GPU (assumed)")
    p.add_argument("--shard-hours", type=float, default=4.0, help="a shard job's time limit, hours")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.tokenizer is None:
        from mllmrec.llm import convert

        a.tokenizer = str(convert.cache_root() / convert.MODEL_NAME)
    m = measure(a.data_dir.resolve(), a.tokenizer)
    rows = []
    for folder in [a.data_dir, *a.project]:
        lengths, items = history_lengths(folder.resolve())
        rows.append(project(folder.name, lengths, items, m, a))
    lengths, items = history_lengths(a.data_dir.resolve())
    scale = a.users_million * 1e6 / max(1, int((lengths > 0).sum()))
    big = np.repeat(lengths, math.ceil(scale))[: int(a.users_million * 1e6)]
    rows.append(project(f"{a.users_million:g}M users (office-like)", big, int(items * scale), m, a))
    out = {"measured": m, "assumptions": {k: getattr(a, k) for k in ("gen_tokens", "image_tokens",
                                                                      "image_description_tokens", "prefill_per_gpu",
                                                                      "decode_per_gpu", "shard_hours")},
           "projection": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
