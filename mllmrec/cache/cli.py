"""``python -m mllmrec.cache <ls|verify|gc|du> [overrides]``: inspect, check and clean a stage cache.

- ``ls``: artifacts per dataset and stage with size, last use and the config that made them;
- ``verify``: every artifact checked in full (sizes and content hashes); exit status 1 when any is
  damaged (``verify.repair=true`` also moves damaged ones aside, so the next run rebuilds them);
- ``gc``: artifacts that no run under ``gc.runs_dir`` references and that were not used for
  ``gc.older_than_days``, plus damaged and orphaned temporary folders as old; a dry run unless
  ``gc.dry_run=false``;
- ``du``: space per dataset and stage.
Settings: ``conf/cache.yaml``; ``paths.cache_dir`` selects the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mllmrec import config as mconfig
from mllmrec.cache import integrity
from mllmrec.cache.integrity import ManifestError
from mllmrec.cache.inventory import Entry, human, referenced, run_references, scan
from mllmrec.errors import ConfigError, report_errors

COMMANDS = ("ls", "verify", "gc", "du")


def _root(cfg: DictConfig) -> Path:
    root = Path(str(cfg.paths.cache_dir)).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError("paths.cache_dir", f"{root} is not a folder")
    return root


def _entries(cfg: DictConfig, root: Path) -> list[Entry]:
    dataset = (cfg.get("dataset") or {}).get("name")
    return list(scan(root, dataset, cfg.get("stage")))


def _config_text(manifest: dict | None, width: int) -> str:
    if manifest is None:
        return "(manifest unreadable)"
    text = json.dumps(manifest.get("config", {}), sort_keys=True, separators=(",", ":"), default=str)
    return text if width <= 0 or len(text) <= width else text[: width - 3] + "..."


def cmd_ls(cfg: DictConfig, root: Path) -> int:
    now, width = time.time(), int(cfg.ls.width)
    print(f"# {root}\n{'dataset/stage':<24} {'key':<16} {'size':>10} {'unused':>8}  config")
    for e in _entries(cfg, root):
        if e.kind != "artifact":
            continue
        print(f"{e.dataset + '/' + e.stage:<24} {e.key:<16} {human(e.size):>10} {e.age_days(now):>7.1f}d  "
              f"{_config_text(e.manifest(), width)}")
    return 0


def cmd_verify(cfg: DictConfig, root: Path) -> int:
    bad = checked = legacy = 0
    for e in _entries(cfg, root):
        if e.kind != "artifact":
            continue
        checked += 1
        try:
            manifest = integrity.read_manifest(e.path)
            problem = f"{integrity.MANIFEST} is missing" if manifest is None else integrity.check(e.path, manifest, True)
        except ManifestError as exc:
            manifest, problem = None, str(exc)
        if manifest is not None and "files" not in manifest:
            legacy += 1
        if problem is None:
            continue
        bad += 1
        print(f"DAMAGED {e.path}: {problem}")
        if cfg.verify.repair:
            integrity.quarantine(e.path, problem, f"{e.dataset}/{e.stage}")
    note = f" ({legacy} with a legacy manifest: checked for readability only)" if legacy else ""
    print(f"verify: {checked} artifacts checked, {bad} damaged{note}")
    return 1 if bad else 0


def cmd_gc(cfg: DictConfig, root: Path) -> int:
    opts = cfg.gc
    entries = _entries(cfg, root)
    runs_dir = Path(str(opts.runs_dir)).expanduser().resolve()
    keep = referenced(entries, run_references(runs_dir, skip=root))
    now, limit = time.time(), float(opts.older_than_days)
    victims = [e for e in entries if e.kind in ("artifact", "damaged", "tmp")
               and e.path.resolve() not in keep and e.age_days(now) > limit]
    verb = "would remove" if opts.dry_run else "removing"
    for e in victims:
        print(f"{verb} {e.path} ({e.kind}, {human(e.size)}, unused {e.age_days(now):.1f}d)")
        if not opts.dry_run:
            _remove(e.path)
    total = human(sum(e.size for e in victims))
    kept = sum(1 for e in entries if e.kind == "artifact") - sum(1 for e in victims if e.kind == "artifact")
    print(f"gc: {len(victims)} entries, {total} {'reclaimable (dry run; gc.dry_run=false removes them)' if opts.dry_run else 'removed'}; "
          f"{kept} artifacts kept ({len(keep)} referenced by runs under {runs_dir})")
    return 0


def _remove(path: Path) -> None:
    """Rename out of sight first, so that no reader ever finds a half-deleted artifact."""
    doomed = path.with_name(f".{path.name}.tmp-gc-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def cmd_du(cfg: DictConfig, root: Path) -> int:
    sizes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in _entries(cfg, root):
        sizes[f"{e.dataset}/{e.stage}"][e.kind] += e.size
    print(f"# {root}\n{'dataset/stage':<24} {'total':>10} {'artifacts':>10} {'damaged':>10} {'tmp':>10} {'work':>10}")
    grand = 0
    for name, by_kind in sorted(sizes.items()):
        total = sum(by_kind.values())
        grand += total
        cols = " ".join(f"{human(by_kind.get(k, 0)):>10}" for k in ("artifact", "damaged", "tmp", "work"))
        print(f"{name:<24} {human(total):>10} {cols}")
    print(f"{'total':<24} {human(grand):>10}")
    return 0


@hydra.main(version_base="1.3", config_path=str(mconfig.CONF_DIR), config_name="cache")
@report_errors
def main(cfg: DictConfig) -> None:
    command = str(cfg.command)
    if command not in COMMANDS:
        raise ConfigError("command", f"must be one of {', '.join(COMMANDS)}, got {command!r}")
    root = _root(cfg)
    status = {"ls": cmd_ls, "verify": cmd_verify, "gc": cmd_gc, "du": cmd_du}[command](cfg, root)
    sys.stdout.flush()
    if status:
        raise SystemExit(status)


def entry(argv: list[str] | None = None) -> None:
    """Accept the command as the first word (``ls``) as well as ``command=ls``."""
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and argv[1] in COMMANDS:
        sys.argv = [argv[0], f"command={argv[1]}", *argv[2:]]
    main()
