"""Internal: the node side: what runs inside ComfyUI for the node pack (``comfy_nodes/``).

:mod:`.support` holds what the node classes call (the any-type, port modes, finding a run for a
prompt); :mod:`.routes` adds the node pack's HTTP routes to ComfyUI's server. The orchestrator
side (executors, transports, ``run_sequential``) lives in :mod:`discomfort.comfy` and
:mod:`discomfort.workflows.tools`; neither side imports the other.
"""
