"""Reward plumbing: resolve recipe entries into reward callables, call and check them, serve them over HTTP.

- `trl_flow.rewards.resolve`: reward specs (built-in names, `module:function`, `file.py:function`, URLs) into
  callables; [`call_reward_func`] and [`validate_rewards`] run and check one the way the trainer does.
- `trl_flow.rewards.remote`: the client of a reward server ([`remote_reward`]) and the wire protocol.
- `trl_flow.rewards.request_checks`: what a server accepts ([`ServerLimits`]) and the checks of a request body.
- `trl_flow.rewards.server`: the server ([`serve_reward`], `trl-flow serve-reward`).

Imports go one way: `server` imports `requests`, `resolve` and `remote`, `resolve` imports `remote`, `requests` and
`remote` none of them (and none imports this package's `__init__`). All import only the standard library and
`reward_funcs` at load.
"""

from __future__ import annotations

from trl_flow.rewards.remote import TOKEN_ENV, RemoteReward, RemoteRewardError, remote_reward
from trl_flow.rewards.resolve import (
    call_reward_func,
    call_reward_func_named,
    resolve_reward_func,
    resolve_reward_funcs,
    reward_func_label,
    reward_func_name,
    validate_rewards,
    validated_reward_func,
)
from trl_flow.rewards.server import RewardServer, main_serve_reward, serve_reward

__all__ = [
    "TOKEN_ENV",
    "RemoteReward",
    "RemoteRewardError",
    "RewardServer",
    "call_reward_func",
    "call_reward_func_named",
    "main_serve_reward",
    "remote_reward",
    "resolve_reward_func",
    "resolve_reward_funcs",
    "reward_func_label",
    "reward_func_name",
    "serve_reward",
    "validate_rewards",
    "validated_reward_func",
]
