# Tollgate quotas on JupyterHub: an example jupyterhub_config.py.
#
# The hub's environment needs Tollgate with its JupyterHub extra:
#
#     pip install 'tollgate[jupyterhub]'
#
# and an integrator token, minted where Tollgate runs:
#
#     tollgate token issue --subject jupyterhub --role integrator --ttl 365d
#
# Before each server starts, Tollgate is asked whether the user (with their hub groups and
# the server's requested CPU, memory and GPUs) may start it. A denial stops the spawn and
# the user sees the decision's sentence, e.g. "You have used 61 of 60 GiB·h (memory-30d) in
# the last 30 days; quota returns from 2026-12-03 14:00 UTC. Ask your admin to join the
# power group." With NATS configured, the hub also reports each server's allocation
# (requested resources x time running) while it runs and a final reading when it stops.

# c is the config object JupyterHub passes to this file.
c = get_config()  # noqa: F821  # type: ignore[name-defined]

from tollgate.jupyterhub import TollgateHooks  # noqa: E402

# Everything can come from the environment (see TollgateHooks.from_env):
#   TOLLGATE_API_URL              Tollgate's API, e.g. http://tollgate-api:8080 (required)
#   TOLLGATE_INTEGRATOR_TOKEN     the integrator token above (required)
#   TOLLGATE_HUB_FAILURE_MODE     open (default): spawn anyway when Tollgate cannot be asked;
#                                 closed: refuse, telling the user to try again later
#   TOLLGATE_NATS_URL             NATS with JetStream; unset: nothing is metered by the hub
#   TOLLGATE_NATS_NKEY_SEED_FILE  against a secured NATS: the seed from
#                                 `tollgate nats-config --host <TOLLGATE_HUB_HOST>`
#   TOLLGATE_PREFIX               subject prefix (default tollgate)
#   TOLLGATE_HUB_HOST             the host name the hub reports as (default jupyterhub-<hostname>)
#   TOLLGATE_HUB_EXPECTED_SECONDS how long a server is expected to run, for the spawn check's
#                                 "does it fit" test and the hold it places (default 3600)
#   TOLLGATE_HUB_TIMEOUT          seconds to wait for a decision (default 10)
#   TOLLGATE_HUB_READING_INTERVAL seconds between allocation readings (default 60; 0: only at stop)
#   TOLLGATE_HUB_CHARGE           limit (default) or guarantee: which of mem_/cpu_limit and
#                                 mem_/cpu_guarantee is charged (the other when it is unset)
#   TOLLGATE_HUB_QUOTA_PAGE_URL   a page where users see their quotas, linked from denials
# Keyword arguments override the environment:
hooks = TollgateHooks.from_env(
    failure_mode="closed",  # 2i2c's preference: nobody spawns while quotas cannot be checked
    quota_page_url="https://tollgate.example.org/",
)

c.Spawner.pre_spawn_hook = hooks.pre_spawn_hook
c.Spawner.post_stop_hook = hooks.post_stop_hook

# What the hooks charge for: the sizes the spawner requests. With KubeSpawner, GPUs come from
# extra_resource_limits (nvidia.com/gpu) and their model from node_selector.
c.Spawner.mem_limit = "4G"
c.Spawner.cpu_limit = 2
# c.KubeSpawner.extra_resource_limits = {"nvidia.com/gpu": "1"}
# c.KubeSpawner.node_selector = {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}

# Group membership is sent with every spawn check, so quotas per group (`applies_to:
# {groups: [...]}` in Tollgate's quota file) follow the hub's groups, e.g.:
# c.JupyterHub.load_groups = {"regular": {"users": ["alice", "bob"]}, "power": {"users": []}}
