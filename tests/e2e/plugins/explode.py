"""A test plugin that raises while rendering, to show a failing plugin changes nothing."""

from kproxy import hookimpl


@hookimpl
def kproxy_pre_render(ctx):
    """Fail on purpose."""
    raise RuntimeError("boom")
