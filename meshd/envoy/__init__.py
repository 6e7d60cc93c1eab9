"""Envoy, the proxy every steered connection goes through: how meshd runs and talks to it.

- :mod:`.admin`: the admin API client (UNIX socket): stats, readiness;
- :mod:`.process`: the binary, its command line, the PID file, pidfd helpers;
- :mod:`.supervisor`: the lifecycle both ways of running Envoy share;
- :mod:`.child`: Envoy as meshd's child process (without systemd);
- :mod:`.systemd_unit`: Envoy as a transient systemd unit;
- :mod:`.systemd_manager`: the systemd D-Bus calls that takes.

Its configuration is rendered by :mod:`meshd.envoy_config`.
"""
from .admin import stats, total  # noqa: F401  (short names for the tests and bench)
