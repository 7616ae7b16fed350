"""Describe stage (SPEC step 1): one image description per item, ``D^s_i = MLLM(Prompt1, image_i)``
-> ``descriptions.parquet`` (itemID, text, finish_reason, prompt_tokens, completion_tokens).

Backends (``llm`` config group): ``vllm`` and ``openai`` generate (resumably, in chunks, see
:mod:`mllmrec.llm.runner`); ``replay`` reads ``llm.items_file``; ``none`` has no descriptions
(the stage returns None). Images come from ``describe.image_dir`` or the metadata's ``imUrl``
(downloaded once into ``<cache_dir>/<dataset>/images/``); items without a usable image get an
empty description (``finish_reason=no_image``), counted in the manifest.
"""

from __future__ import annotations

import logging

from mllmrec.cache import Artifact, ArtifactCache
from mllmrec.data import RecData, file_sha256
from mllmrec.llm import backends, images, prompts, replay, runner
from mllmrec.llm.settings import LLMSettings

log = logging.getLogger(__name__)

STAGE = "describe"
OUTPUT = "descriptions.parquet"


def run(dcfg, llm: LLMSettings, data: RecData, cache: ArtifactCache, dataset_label: str) -> Artifact | None:
    """The descriptions artifact, or None when there are none (``llm=none`` or ``describe.enabled=false``).

    ``dcfg``: the ``describe`` node (None: defaults); ``llm``: the checked ``llm`` settings;
    ``dataset_label``: the dataset's name as Prompt1 says it (``dataset.display_name``)."""
    dcfg = dcfg or {}
    if llm.backend == "none" or not dcfg.get("enabled", True):
        log.info("describe: skipped (llm=%s, describe.enabled=%s)", llm.backend, dcfg.get("enabled", True))
        return None
    if llm.backend == "replay":
        if not llm.replay.items_file:
            log.info("describe: llm=replay without llm.items_file: no image descriptions")
            return None
        return replay.artifact(cache, STAGE, data, llm.replay, "item", OUTPUT, "itemID")

    template = prompts.check_template(dcfg.get("prompt"), prompts.DATASET_SLOT, "describe.prompt")
    text = prompts.render(template, prompts.DATASET_SLOT, str(dataset_label))
    postprocess = runner.check_postprocess(dcfg.get("postprocess", "last_paragraph"), "describe.postprocess")

    found = images.resolve(data, dcfg, cache.root / cache.dataset / "images")
    # which items have an image is known once they are resolved: llm.limit / llm.shard pick from
    # those, then the chosen images are hashed (all chosen ones in a shard job too: whether the
    # artifact is published already depends on every request, and nothing here is tokenized)
    picked = runner.pick(STAGE, [i for i, p in enumerate(found.paths) if p is not None], llm.selection)
    requests = [backends.Request(i, text, image=found.paths[i], image_hash=file_sha256(found.paths[i]))
                for i in picked.chosen]
    counts = {"image_source": found.source, **found.counts}
    return runner.generate(
        cache, STAGE, llm, id_column="itemID", n_rows=data.n_items, requests=requests, picked=picked,
        prompt=template, assembly={"postprocess": postprocess}, output=OUTPUT, fill_reason="no_image",
        counts=counts, desc=f"describe ({llm.backend})",
    )


def load_texts(artifact: Artifact) -> list[str]:
    return runner.read_texts(artifact, OUTPUT, "itemID")
