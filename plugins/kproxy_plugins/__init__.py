"""kproxy's built-in plugins.

Each module is a plugin registered through the ``kproxy`` entry-point group, exactly as a
third party's would be, and uses only kproxy's public API. ``DEFAULT_PLUGINS`` is the
default set the ``kproxy`` distribution declares (entry-point group ``kproxy.defaults``).
"""

DEFAULT_PLUGINS = ("service-maps", "masquerade", "interfaces", "conntrack-cleanup", "healthcheck-nodeports")
