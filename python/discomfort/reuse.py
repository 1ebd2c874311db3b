"""A workflow that would build the same references again is not queued again.

A loop that alternates a "load" workflow (a checkpoint loader into ports, by reference) with a
"sample" workflow loses the model on ComfyUI's default cache: that cache keeps only the latest
prompt's outputs, so every iteration loads the checkpoint again and every node downstream of the
new references runs again. A run remembers, per workflow prompt it ran, the versions its ports
wrote; when the same prompt comes again (same nodes, same widget values, same inputs by version:
:func:`~discomfort.runs.run_digests`), on the same server, and every key it writes still holds
what it wrote, by reference, the prompt is not queued: its outputs are those objects.

Never reused (the prompt is queued as usual):

* a prompt with a node whose class defines ``IS_CHANGED`` (or a V3 node's ``fingerprint_inputs``):
  its output may change while its inputs do not (``LoadImage``, ``LoadImageMask``, ``LoadAudio``,
  ``LoadVideo``, ``LoadLatent``, any custom node with such a method). The server says which classes
  do (``GET /discomfort/node_fingerprints``; in process, the classes themselves); the project's
  own ports and loaders aside, whose fingerprints the digest covers;
* a prompt with an output node other than the ports (``SaveImage``, ``PreviewImage``, ...): its
  side effect is the point;
* a prompt whose ports write a value (not a reference): a value is cheap to carry, and a later
  change in place must never be hidden;
* a prompt whose widgets changed (a seed control between iterations): its digest differs;
* everything, with ``rerun="always"``.

When a prompt runs again unchanged and its references come back as new objects, the server's cache
did not keep them (ComfyUI's default cache keeps only the latest prompt's outputs): the run warns
once, naming ``--cache-lru`` and a held ``Run``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from .prompt_forms import FINGERPRINTS_ROUTE, fingerprinted_classes, node_types, prompt_as_run
from .runs import key_versions, run_digests
from .workflows.format import LOADER_CLASS, PORT_CLASS

__all__ = ["Reuse", "Decision", "RERUN", "is_reference", "wrote"]

log = logging.getLogger("discomfort")

#: ``rerun=`` values: "auto" (reuse what :class:`Reuse` allows) or "always" (queue every workflow).
RERUN = ("auto", "always")
_OURS = (PORT_CLASS, LOADER_CLASS)


def _fingerprints_of(target: Any) -> frozenset[str] | None:
    """The fingerprinted classes of an executor: in process from its classes, a server through the
    node pack's route; None when it cannot say (nothing is reused there)."""
    mappings = getattr(target, "node_class_mappings", None)
    if isinstance(mappings, Mapping):
        return frozenset(fingerprinted_classes(mappings))
    ask = getattr(target, "get_json", None)
    if not callable(ask):
        return None
    try:
        answer = ask(FINGERPRINTS_ROUTE)
    except Exception as exc:  # noqa: BLE001  (an older node pack: no reuse on that server)
        log.debug("discomfort: %r does not list its fingerprinted nodes (%s): workflows are not reused there",
                  target, exc)
        return None
    names = answer.get("is_changed") if isinstance(answer, Mapping) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return frozenset(names)


class Reuse:
    """What a run remembers of the prompts it ran: per digest, where and the versions written."""

    def __init__(self) -> None:
        self._ran: dict[str, tuple[str, dict[str, int | None]]] = {}  # digest -> (where, versions written)
        self._fingerprints: dict[str, frozenset[str] | None] = {}  # where -> fingerprinted classes
        self._warned = False
        self.rerun = "auto"
        self.reused: list[tuple[int, int]] = []  # (iteration, workflow) not queued in this call

    def begin(self, rerun: str) -> None:
        """A new call of the loop: ``rerun`` ("auto" or "always")."""
        if rerun not in RERUN:
            raise ValueError(f"rerun={rerun!r}: 'auto' (a workflow that would build the same references "
                             "again is not queued) or 'always'")
        self.rerun = rerun
        self.reused = []

    def consider(self, ctx: Any, prompt: dict, placement: Any, slot: Any, outs: list[str], iteration: int,
                 k: int) -> "Decision":
        """Whether workflow ``k``'s ``prompt`` may be skipped now, and what to remember if it runs."""
        where = placement.where(slot)
        if not outs:  # writes nothing: nothing to reuse, nothing to warn about
            return Decision(self, ctx, None, where, outs, False, iteration, k)
        target = placement.prompt_target(slot)
        try:
            form = prompt_as_run(prompt, target)
            digest = run_digests(form, ctx.run_id, lambda keys: key_versions(ctx, keys))[0]
        except (TypeError, ValueError):
            return Decision(self, ctx, None, where, outs, False, iteration, k)
        before = self._ran.get(digest)
        why = self._why_not(ctx, prompt, target, where, outs, before)
        skip = why is None
        if skip:
            self.reused.append((iteration, k))
            log.info("discomfort: run %s: iteration %d, workflow %d: not queued again: the same prompt wrote %s, "
                     "still held", ctx.run_id, iteration + 1, k + 1, ", ".join(map(repr, outs)))
        return Decision(self, ctx, digest, where, outs, skip, iteration, k, before, form)

    def _why_not(self, ctx: Any, prompt: dict, target: Any, where: str, outs: list[str],
                 before: tuple[str, dict[str, int | None]] | None) -> str | None:
        if self.rerun == "always":
            return "rerun='always'"
        if before is None or before[0] != where:
            return "not run before here"
        now = key_versions(ctx, outs)
        if any(now[uid] is None or now[uid] != before[1].get(uid) for uid in outs):
            return "its outputs changed since"
        if not all(is_reference(ctx, uid) for uid in outs):
            return "it writes values"
        classes = {n.get("class_type") for n in prompt.values() if isinstance(n, dict)}
        if where not in self._fingerprints:
            self._fingerprints[where] = _fingerprints_of(target)
        fingerprinted = self._fingerprints[where]
        if fingerprinted is None or (classes - set(_OURS)) & fingerprinted:
            return "a node may change while its inputs do not"
        types = node_types(target)
        if types is None:
            return "its output nodes are not known"
        for cls in classes - set(_OURS):
            found = types(cls)
            if found is None or found[1]:
                return "an output node"
        return None

    def ran(self, decision: "Decision", after: dict[str, int | None]) -> None:
        """The prompt of ``decision`` ran and its ports wrote ``after``: remember it, and warn once
        when the same prompt built its references again as new objects."""
        if decision.digest is None:
            return
        before = decision.before
        self._ran[decision.digest] = (decision.where, dict(after))
        if self._warned or before is None or before[0] != decision.where:
            return
        renewed = [uid for uid in decision.outs if after.get(uid) != before[1].get(uid)
                   and is_reference(decision.ctx, uid)]
        if renewed:
            self._warned = True
            log.warning(
                "discomfort: run %s: workflow %d ran the same prompt again and built %s anew: the ComfyUI cache on "
                "%s did not keep them (its default cache keeps only the latest prompt's outputs), so they load "
                "on every iteration. Start the server with --cache-lru N (InProcessComfy.set_cache(lru=N) in "
                "process), or run that workflow once in a held Run (Run.execute) and loop the others.",
                decision.ctx.run_id, decision.k + 1, ", ".join(map(repr, renewed)), decision.where)


class Decision:
    """One workflow's answer from :meth:`Reuse.consider`: ``skip`` it, else :meth:`ran` after it.
    ``form``: the prompt as the nodes get it (:func:`~discomfort.prompt_forms.prompt_as_run`),
    when the decision made it (None otherwise), for the run to register without making it again."""

    def __init__(self, reuse: Reuse, ctx: Any, digest: str | None, where: str, outs: list[str], skip: bool,
                 iteration: int, k: int, before: tuple[str, dict[str, int | None]] | None = None,
                 form: dict | None = None) -> None:
        self.reuse, self.ctx, self.digest, self.where, self.outs = reuse, ctx, digest, where, outs
        self.skip, self.iteration, self.k, self.before, self.form = skip, iteration, k, before, form

    def ran(self, after: dict[str, int | None]) -> None:
        self.reuse.ran(self, after)


def is_reference(ctx: Any, uid: str) -> bool:
    """Whether ``uid`` holds a reference to an object living in the process that saved it."""
    if uid not in ctx:
        return False
    encoded = getattr(ctx, "load_encoded", None)
    if encoded is not None:
        return encoded(uid)[0] == "ref"
    return ctx.info(uid).get("kind") == "ref"


def wrote(ctx: Any, uid: str, before: int | None, after: int | None) -> bool:
    """Whether a port wrote ``uid`` in a prompt that ran: a new version, or the same version of a
    reference (saving the very object a key holds by reference keeps its version, so ComfyUI's
    cache stays valid downstream)."""
    return after is not None and (after != before or is_reference(ctx, uid))
