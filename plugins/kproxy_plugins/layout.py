"""Names the built-in plugins share in kproxy's main tables.

The built-ins cooperate through these names: the masquerade plugin adds its source
check to service-maps' ``services`` chain when offered it and reads ``cluster-ips``;
any plugin requests masquerade by setting the masquerade bit (``mark_statement``). A
plugin that replaces a built-in keeps the names it is expected to provide.
"""

SERVICES = "services"  # nat: dispatch of new connections to service destinations
CLUSTER_IPS = "cluster-ips"  # set of every active ClusterIP
MASQUERADING = "masquerading"
HAIRPIN = "hairpin"  # set of endpoint . endpoint address pairs


def mark_statement(ctx) -> str:
    """The statement that asks for a connection to be masqueraded."""
    return f"meta mark set meta mark | {hex(ctx.config.masquerade_mark)}"
