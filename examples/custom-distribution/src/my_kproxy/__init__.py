"""my-kproxy: kproxy's own default plugins plus the contrib plugins, enabled by default."""

from kproxy_plugins import DEFAULT_PLUGINS as KPROXY_DEFAULTS

DEFAULT_PLUGINS = (*KPROXY_DEFAULTS, "service-counters", "connlimit")
