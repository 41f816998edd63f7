"""Serving vlora subspaces and exports through vLLM.

* :mod:`vlora.serving.materialize`: a task's vLLM-ready adapter folder, written on demand
  under a path named by the task's content (never rewritten in place), and the cleanup
  that bounds those folders' disk use.
* :mod:`vlora.serving.vllm_plugin`: the LoRA resolver vLLM loads through the
  ``vllm.general_plugins`` entry point; inert unless ``VLORA_SUBSPACE`` is set.
* :mod:`vlora.serving.refresh`: the watcher of ``vlora serve`` that unloads names whose task
  changed in a new generation of the subspace.
* :mod:`vlora.serving.vllm_driver`: runs adapter folders through vLLM's offline engine
  (used by the tests; run with the vLLM environment's python).
* :mod:`vlora.serving.vllm_platform`: an opt-in vLLM CPU platform (``vllm.platform_plugins``
  entry point, off unless ``VLORA_VLLM_PLATFORM=1``) whose LoRA wrapper runs one matmul per
  adapter in the batch instead of gathering each token's weights (docs/VLLM.md).

Nothing here imports vLLM at module level: vlora's own environment does not have it.
"""
