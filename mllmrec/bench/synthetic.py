"""``python -m mllmrec.bench.synthetic users=.. items=.. interactions=.. seed=.. out=DIR``

A synthetic dataset in MMRec's format, at any size, for the scale benchmark
(:mod:`mllmrec.bench.scale`) and for checking that a model learns something at scale.

The model (a nonnegative latent-factor model, PLSA/LDA-like):

- every item i has a popularity ``pop_i = (r_i + 1) ** -item_zipf`` (r_i a seeded random rank)
  and one of ``topics`` latent topics t_i; topic c has mass ``m_c`` = its items' popularity share;
- every user u has a topic mixture ``theta_u ~ Dirichlet(concentration * m)`` (a few topics) and an
  activity ``n_u = 5 + extra_u``, the extras Zipf-distributed over a seeded user rank
  (``user_zipf``), capped at ``items // 10``, summing to ``interactions - 5 * users``;
- u draws n_u distinct items, each from ``P(i | u) = (1 - noise) sum_c theta_uc pop_i [t_i = c] / Z_c
  + noise pop_i / Z`` (its marginal over users is ``pop_i / Z``: the long tail);
- item features (``text_feat.npy``, and a second, noisier modality ``image_feat.npy``) are noisy
  random projections of the item's latent vector (its topic's centroid plus a small jitter); user
  features (``user_feat.npy``) the same projection of the user's mixture of centroids, plus noise.

Then the 5-core is taken (as ``prepare`` does; the least popular items may drop out, so the counts
written can be a little below those asked) and MMRec's random per-user split
(:func:`mllmrec.prepare.split.split_labels`) labels the rows. Users are drawn in fixed chunks of
``CHUNK_USERS`` with a random generator seeded by ``(seed, chunk)``: memory stays bounded (no dense
users x items array; arrays of the size of the interactions, and users x topics), and the same
seed gives the same bytes. The folder holds ``<name>.inter``, the three ``.npy`` feature files and
``synthetic.json`` (the parameters and the counts); it is written in a temporary folder and
renamed into place.

Use it as a dataset: ``dataset=synthetic dataset.data_dir=DIR`` (``conf/dataset/synthetic.yaml``
names the feature files for ``dataset.features`` / ``item_features`` / ``user_features``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mllmrec.errors import ConfigError

log = logging.getLogger("mllmrec.bench.synthetic")

CHUNK_USERS = 8192  # part of the definition: the same seed gives the same bytes at any size
FEATURE_CHUNK = 65536
KCORE = 5
FILES = {"text": "text_feat.npy", "image": "image_feat.npy", "users": "user_feat.npy"}


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 35_000
    items: int = 18_000
    interactions: int = 300_000  # all rows (train + valid + test) before the 5-core
    seed: int = 0
    user_zipf: float = 0.5  # activity long tail (exponent over the user rank)
    item_zipf: float = 0.6  # popularity long tail (exponent over the item rank)
    topics: int = 64
    concentration: float = 1.0  # Dirichlet total of the user topic mixtures: small = focused users
    noise: float = 0.2  # share of each user's draws from popularity alone
    latent_dim: int = 32
    item_jitter: float = 0.3  # item latent = topic centroid + jitter * N(0, 1)
    feature_dim: int = 384
    feature_noise: float = 1.0  # noise std per feature dimension (the signal has ~unit variance)
    image_noise: float = 2.0  # the image modality: the same latent, another projection, noisier

    def check(self) -> None:
        for key in ("users", "items", "interactions", "topics", "latent_dim", "feature_dim"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.items < 2 * KCORE:
            raise ConfigError("items", f"must be >= {2 * KCORE} for a {KCORE}-core, got {self.items}")
        if self.interactions < KCORE * self.users:
            raise ConfigError("interactions", f"must be >= {KCORE} x users = {KCORE * self.users} (the {KCORE}-core), "
                              f"got {self.interactions}")
        if self.interactions > self.users * (self.items // 10):
            raise ConfigError("interactions", f"at most users x items/10 = {self.users * (self.items // 10)} "
                              f"(a user draws at most items/10), got {self.interactions}")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError("noise", f"must be in [0, 1], got {self.noise}")
        for key in ("user_zipf", "item_zipf", "concentration", "item_jitter", "feature_noise", "image_noise"):
            if float(getattr(self, key)) < 0 or (key == "concentration" and self.concentration == 0):
                raise ConfigError(key, f"must be {'> 0' if key == 'concentration' else '>= 0'}, got {getattr(self, key)}")


# ---------------------------------------------------------------------------- pieces (pure)
def activity(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """n_u per user: 5 + a Zipf share of the extra interactions, capped at items // 10 (the excess
    goes to the others, water-filling), rounded by largest remainders to sum exactly."""
    extra_total = spec.interactions - KCORE * spec.users
    cap = spec.items // 10 - KCORE
    rank = rng.permutation(spec.users)
    w = (rank + 1.0) ** -spec.user_zipf
    extra = np.zeros(spec.users)
    free = np.ones(spec.users, bool)
    left = float(extra_total)
    for _ in range(100):
        share = np.where(free, w, 0.0)
        extra = np.where(free, left * share / share.sum(), extra)
        over = free & (extra > cap)
        if not over.any():
            break
        extra[over] = cap
        free &= ~over
        left = extra_total - extra[~free].sum()
    base = np.floor(extra).astype(np.int64)
    short = int(extra_total - base.sum())
    if short > 0:  # largest remainders (ties: smaller user id), never above the cap
        rem = np.where(base < cap, extra - base, -1.0)
        base[np.lexsort((np.arange(spec.users), -rem))[:short]] += 1
    return KCORE + base


def item_model(spec: SyntheticSpec, rng: np.random.Generator):
    """(popularity, topic, order by (topic, item), cumulative popularity in that order, topic bounds)."""
    pop = (rng.permutation(spec.items) + 1.0) ** -spec.item_zipf
    topic = rng.integers(spec.topics, size=spec.items)
    order = np.lexsort((np.arange(spec.items), topic))
    cum = np.cumsum(pop[order])
    bounds = np.searchsorted(topic[order], np.arange(spec.topics + 1))  # topic c: order[bounds[c]:bounds[c+1]]
    return pop, topic, order, cum, bounds


def _mixtures(spec: SyntheticSpec, mass: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n users' topic mixtures ~ Dirichlet(concentration * mass), as float64 rows summing to 1."""
    g = rng.gamma(np.maximum(spec.concentration * mass, 1e-4), size=(n, spec.topics))
    s = g.sum(1, keepdims=True)
    empty = s[:, 0] == 0
    if empty.any():  # all-zero draws of tiny shapes: the most likely topic
        g[empty, int(np.argmax(mass))] = 1.0
        s = g.sum(1, keepdims=True)
    return g / s


def _draw(theta, owner, spec, model, rng, noise):
    """One item per entry of ``owner`` (a local user index) from P(i | u)."""
    _, _, order, cum, bounds = model
    n_draw = len(owner)
    k = theta.shape[1]
    cum_theta = (np.cumsum(theta, 1) + np.arange(theta.shape[0])[:, None]).ravel()
    r = rng.random(n_draw)
    c = np.searchsorted(cum_theta, owner + r * (1 - 1e-12), side="right") - owner * k
    c = np.clip(c, 0, k - 1)
    # an empty topic (no item) falls back to the popularity draw
    from_pop = (rng.random(n_draw) < noise) | (bounds[c + 1] == bounds[c])
    lo = np.where(from_pop, 0, bounds[c])
    hi = np.where(from_pop, len(order), bounds[c + 1])
    before = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    target = before + rng.random(n_draw) * (cum[hi - 1] - before)
    pos = np.clip(np.searchsorted(cum, target, side="right"), lo, hi - 1)
    return order[pos]


def draw_chunk(spec: SyntheticSpec, model, theta: np.ndarray, n_u: np.ndarray, rng: np.random.Generator):
    """(local user, item) pairs: each user's n_u distinct items, in draw order, grouped by user."""
    owners, items = np.zeros(0, np.int64), np.zeros(0, np.int64)
    need = n_u.copy()
    for round_ in range(200):
        todo = np.flatnonzero(need > 0)
        if todo.size == 0:
            break
        per = need[todo] + np.maximum(need[todo] // 2, 2) * (1 + round_)
        owner = np.repeat(todo, per)
        noise = spec.noise if round_ < 20 else 1.0  # the stubborn few: popularity draws only
        owners = np.concatenate([owners, owner])
        items = np.concatenate([items, _draw(theta, owner, spec, model, rng, noise)])
        key = owners * spec.items + items
        _, first = np.unique(key, return_index=True)
        first.sort()  # first occurrences, in draw order (grouped by user: owners are sorted per round)
        owners, items = owners[first], items[first]
        order = np.argsort(owners, kind="stable")
        owners, items = owners[order], items[order]
        counts = np.bincount(owners, minlength=len(n_u))
        rank = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = rank < n_u[owners]
        owners, items = owners[keep], items[keep]
        need = n_u - np.bincount(owners, minlength=len(n_u))
    else:
        raise RuntimeError("synthetic: some users could not draw their distinct items (items too few)")
    return owners, items


def interactions(spec: SyntheticSpec, progress: bool = True):
    """(users, items, theta [users x topics] float32, item model): the raw interactions before the 5-core."""
    rng = np.random.default_rng([spec.seed, 0])
    n_u = activity(spec, rng)
    model = item_model(spec, rng)
    pop, topic = model[0], model[1]
    mass = np.bincount(topic, weights=pop, minlength=spec.topics) / pop.sum()
    users_out, items_out = [], []
    theta_all = np.empty((spec.users, spec.topics), np.float32)
    starts = range(0, spec.users, CHUNK_USERS)
    for ci, start in enumerate(tqdm(starts, desc="synthetic: users", unit="chunk", disable=not progress or len(starts) < 2)):
        stop = min(start + CHUNK_USERS, spec.users)
        crng = np.random.default_rng([spec.seed, 1, ci])
        theta = _mixtures(spec, mass, stop - start, crng)
        theta_all[start:stop] = theta
        owners, items = draw_chunk(spec, model, theta, n_u[start:stop], crng)
        order = np.lexsort((items, owners))  # per user by item id
        users_out.append((owners[order] + start).astype(np.int32))
        items_out.append(items[order].astype(np.int32))
    return np.concatenate(users_out), np.concatenate(items_out), theta_all, model


def _projected(latent: np.ndarray, w: np.ndarray, noise: float, seed_key: list, dest: np.ndarray) -> None:
    """dest[:] = latent @ w + noise * N(0, 1), in row chunks with per-chunk seeds (float32)."""
    for ci, start in enumerate(range(0, latent.shape[0], FEATURE_CHUNK)):
        stop = min(start + FEATURE_CHUNK, latent.shape[0])
        rng = np.random.default_rng([*seed_key, ci])
        block = latent[start:stop].astype(np.float64) @ w
        block += noise * rng.standard_normal(block.shape)
        dest[start:stop] = block.astype(np.float32)


def generate(spec: SyntheticSpec, out: Path, name: str = "synthetic", overwrite: bool = False,
             progress: bool = True) -> dict:
    """Write the dataset folder ``out`` (see the module doc); returns its summary (synthetic.json)."""
    from mllmrec.prepare.kcore import kcore_mask
    from mllmrec.prepare.split import split_labels
    from mllmrec.prepare.write import check_destination, publishing

    spec.check()
    out = Path(out).expanduser()
    check_destination(out, overwrite)
    users, items, theta, model = interactions(spec, progress)
    _, topic = model[0], model[1]
    keep, passes = kcore_mask(users, items, KCORE)
    users, items = users[keep], items[keep]
    kept_users = np.flatnonzero(np.bincount(users, minlength=spec.users) > 0)
    kept_items = np.flatnonzero(np.bincount(items, minlength=spec.items) > 0)
    new_user = np.full(spec.users, -1, np.int64)
    new_user[kept_users] = np.arange(len(kept_users))
    new_item = np.full(spec.items, -1, np.int64)
    new_item[kept_items] = np.arange(len(kept_items))
    users, items = new_user[users], new_item[items]
    labels = split_labels(users, np.zeros(len(users)), rule="random", seed=spec.seed)

    rng = np.random.default_rng([spec.seed, 2])
    centroids = rng.standard_normal((spec.topics, spec.latent_dim))
    jitter = np.random.default_rng([spec.seed, 3]).standard_normal((spec.items, spec.latent_dim))
    item_latent = (centroids[topic] + spec.item_jitter * jitter)[kept_items]
    w_text = rng.standard_normal((spec.latent_dim, spec.feature_dim)) / np.sqrt(spec.latent_dim)
    w_image = rng.standard_normal((spec.latent_dim, spec.feature_dim)) / np.sqrt(spec.latent_dim)
    summary = {
        "spec": asdict(spec), "name": name, "users": int(len(kept_users)), "items": int(len(kept_items)),
        "interactions": int(len(users)), "train": int((labels == 0).sum()), "valid": int((labels == 1).sum()),
        "test": int((labels == 2).sum()), "kcore_passes": int(passes),
        "dropped": {"users": int(spec.users - len(kept_users)), "items": int(spec.items - len(kept_items))},
        "files": {"inter": f"{name}.inter", **FILES},
    }
    with publishing(out, overwrite) as tmp:
        _write_inter(tmp / f"{name}.inter", users, items, labels)
        for key, w, noise in (("text", w_text, spec.feature_noise), ("image", w_image, spec.image_noise)):
            dest = np.lib.format.open_memmap(tmp / FILES[key], "w+", np.float32, (len(kept_items), spec.feature_dim))
            _projected(item_latent, w, noise, [spec.seed, 4, 0 if key == "text" else 1], dest)
            dest.flush()
            del dest
        dest = np.lib.format.open_memmap(tmp / FILES["users"], "w+", np.float32, (len(kept_users), spec.feature_dim))
        for start in range(0, len(kept_users), FEATURE_CHUNK):  # bounded: users x latent in chunks
            rows = kept_users[start:start + FEATURE_CHUNK]
            latent = theta[rows].astype(np.float64) @ centroids
            _projected(latent, w_text, spec.feature_noise, [spec.seed, 5, start // FEATURE_CHUNK], dest[start:start + len(rows)])
        dest.flush()
        del dest
        (tmp / "synthetic.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("synthetic: %d users, %d items, %d interactions (train %d) -> %s", summary["users"], summary["items"],
             summary["interactions"], summary["train"], out)
    return summary


def _write_inter(path: Path, users: np.ndarray, items: np.ndarray, labels: np.ndarray, chunk: int = 1 << 20) -> None:
    """``userID itemID x_label`` tab-separated, with a header; written in row chunks."""
    import pandas as pd

    with open(path, "w", newline="\n") as f:
        for start in range(0, len(users), chunk):
            end = start + chunk
            block = pd.DataFrame({"userID": users[start:end], "itemID": items[start:end], "x_label": labels[start:end]})
            block.to_csv(f, sep="\t", index=False, header=start == 0, lineterminator="\n")


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig  # noqa: F401

    from mllmrec import config as mconfig
    from mllmrec.errors import report_errors

    @hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="synthetic")
    @report_errors
    def _main(cfg) -> None:
        fields = SyntheticSpec.__dataclass_fields__
        spec = SyntheticSpec(**{k: type(f.default)(cfg[k]) for k, f in fields.items() if k in cfg})
        summary = generate(spec, Path(cfg.out), name=str(cfg.name), overwrite=bool(cfg.overwrite))
        print(f"{summary['users']} users, {summary['items']} items, {summary['interactions']} interactions "
              f"(train {summary['train']}): {Path(cfg.out).expanduser()}")

    _main()


if __name__ == "__main__":
    main()
