"""The octoproxy agent: supervises one proxy process.

It starts the proxy, checks ``/healthz`` and ``/ready``, restarts it on crash
or failed liveness checks (with back-off, and a crash-loop stop), upgrades it
through hot restart with rollback, and reports over its own admin API. See
``docs/agent.md``.
"""

from __future__ import annotations

from ._api import UpgradeClientError as UpgradeClientError
from ._api import post_upgrade as post_upgrade
from ._config import AgentConfig as AgentConfig
from ._config import AgentSettings as AgentSettings
from ._config import load_agent_config as load_agent_config
from ._config import parse_agent_config as parse_agent_config
from ._config import render_agent_reference as render_agent_reference
from ._policy import TRANSITIONS as TRANSITIONS
from ._policy import Action as Action
from ._policy import Decision as Decision
from ._policy import Event as Event
from ._policy import Policy as Policy
from ._policy import PolicyConfig as PolicyConfig
from ._policy import PolicyError as PolicyError
from ._policy import State as State
from ._policy import backoff_delay as backoff_delay
from ._policy import render_mermaid as render_mermaid
from ._supervisor import Agent as Agent
from ._supervisor import UpgradeBusy as UpgradeBusy
from ._supervisor import UpgradeResult as UpgradeResult

__all__ = [
    "Action", "Agent", "AgentConfig", "AgentSettings", "Decision", "Event", "Policy", "PolicyConfig", "PolicyError",
    "State", "TRANSITIONS", "UpgradeBusy", "UpgradeClientError", "UpgradeResult", "backoff_delay",
    "load_agent_config", "parse_agent_config", "post_upgrade", "render_agent_reference", "render_mermaid",
]  # fmt: skip
