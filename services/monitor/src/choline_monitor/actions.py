"""What the monitor does on its own when a run goes bad: its policy, and the automatic pause.

A run's **policy** is ``notify`` (the default: findings are stored, published, sent to webhooks,
and that is all) or ``auto-pause``: a critical finding from one of the ``pause_on`` detectors
(default ``nan`` and ``divergence``) pauses the run so that a broken run stops billing. The
pause goes through the same path as a user's ``choline pause RUN``: a ``ControlCommand`` with
action ``pause`` on the run's control subject (``by: "monitor"``), which the provisioner turns
into ``pausing`` (checkpoint, then release the box) and then ``paused``. ``choline resume RUN``
(after a fix, or with ``policy=notify``) starts it again from that checkpoint.

The policy is set per run through the monitor's ``policy`` request (``choline monitor RUN
policy=auto-pause``, ``choline run --monitor-policy auto-pause``, ``PUT /v1/runs/{id}/monitor``),
or for the whole installation with ``CHOLINE_MONITOR_POLICY``.

Exactly once, as far as it matters: the action's row (``monitor_action``, id derived from the
finding) is stored before the command is published, and the command's message id is the action's
id, so a finding handled twice (a redelivery, the outbox sweep, two replicas) pauses once. A
finding whose data is older than ``pause_max_age_s`` (a monitor catching up after an outage) does
not pause: the run may have been resumed since, on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import time

from choline_core.bus import Bus
from choline_core.events import ControlAction, ControlCommand

from .advice_store import ActionRow, AdviceStore, action_id
from .models import utcnow
from .watch import Finding

log = logging.getLogger(__name__)

NOTIFY = "notify"
AUTO_PAUSE = "auto-pause"


class Actions:
    def __init__(
        self,
        store: AdviceStore,
        bus: Bus | None,
        *,
        default_policy: str = NOTIFY,
        pause_on: list[str] | None = None,
        pause_max_age_s: float = 900.0,
    ) -> None:
        self.store = store
        self.bus = bus
        self.default_policy = default_policy
        self.pause_on = list(pause_on if pause_on is not None else ["nan", "divergence"])
        self.pause_max_age_s = pause_max_age_s
        self.paused = 0

    async def policy(self, run_id: str) -> tuple[str, bool]:
        """(the policy in force for the run, whether it was set for this run)."""
        own = await asyncio.to_thread(self.store.policy, run_id)
        return (own, True) if own else (self.default_policy, False)

    async def on_finding(self, f: Finding) -> str | None:
        """Act on a published finding as the run's policy says; returns the action taken, if any.

        Raises ``BusError`` when the pause could not be published (the caller leaves the finding
        unpublished, and the outbox sweep brings it back here)."""
        if f.severity != "critical" or f.detector not in self.pause_on:
            return None
        policy, _ = await self.policy(f.run_id)
        if policy != AUTO_PAUSE:
            return None
        aid = action_id(f.id, "pause")
        row = await asyncio.to_thread(
            self.store.begin_action,
            ActionRow(id=aid, run_id=f.run_id, finding_id=f.id, action="pause", status="pending", created_at=utcnow()),
        )
        if row.status != "pending":
            return None  # done (or skipped) before
        age = time.time() - f.t
        if age > self.pause_max_age_s:
            detail = f"not paused: the finding's data is {age:.0f}s old (over {self.pause_max_age_s:g}s)"
            await asyncio.to_thread(self.store.finish_action, aid, "skipped", detail)
            log.info("%s on %s: %s", f.detector, f.run_id, detail, extra={"run_id": f.run_id})
            return None
        if self.bus is None:
            return None
        command = ControlCommand(run_id=f.run_id, action=ControlAction.pause, by="monitor")
        env = command.envelope(id=aid)
        await self.bus.publish(self.bus.subjects.run_control(f.run_id), env)
        detail = f"paused on {f.detector} at step {f.step}: {f.message}"
        await asyncio.to_thread(self.store.finish_action, aid, "sent", detail[:2000])
        self.paused += 1
        log.warning(
            "auto-pause of %s (policy auto-pause): %s", f.run_id, detail, extra={"run_id": f.run_id, "msg_id": aid}
        )
        return "pause"
