"""Failpoints: named places where a test can make the real process crash or stall.

Recovery is only believable if a process can die at the exact step that
matters — after the commit decision and before phase two, say. A failpoint is
armed through the environment, ``DTX_FAILPOINTS="coordinator.after_decision=kill"``
(several separated by ``;``); actions are ``kill`` (SIGKILL of this very
process) and ``sleep(ms)``. Unarmed, a failpoint costs one dict lookup.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal

_ACTION = re.compile(r"^(kill|sleep\((\d{1,7})\))$")


def _parse(spec: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, action = item.partition("=")
        if not sep or not _ACTION.match(action.strip()):
            raise ValueError(f"DTX_FAILPOINTS: {item!r} is not name=kill or name=sleep(ms)")
        armed[name.strip()] = action.strip()
    return armed


_ARMED = _parse(os.environ.get("DTX_FAILPOINTS", ""))


async def failpoint(name: str) -> None:
    """Trigger the action armed for ``name``, if any."""
    action = _ARMED.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    match = _ACTION.match(action)
    assert match is not None
    await asyncio.sleep(int(match.group(2)) / 1000)
