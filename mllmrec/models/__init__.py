"""The model zoo: one module per ``conf/model/<name>.yaml`` (``_target_: mllmrec.models.<name>.<Class>``),
after MMRec's ``src/models/<name>.py`` and RecBole's one-file-per-model layout; docs/models.md has
one row per model (file, config, paper, the code it follows, modalities, deviations).

Shared pieces: :mod:`.base` (the ranking base and the :class:`~.base.Inputs` a model receives),
:mod:`.layers` (propagation and edge layers), :mod:`.losses` (the two BPR forms, EmbLoss, in-batch
InfoNCE), :mod:`.knn_graphs` (the models' modality kNN item graphs and the refined-graph switch),
:mod:`.modalities` (feature files as data) and :mod:`.static_step` (MLLMRec's CUDA-graph step).
"""
