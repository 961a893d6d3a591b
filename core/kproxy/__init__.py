"""kproxy: a Kubernetes service proxy on nftables whose every datapath feature is a plugin.

The core (this package) knows Services, endpoints, nftables objects and the sync engine;
it names no datapath feature. Features live in plugins (see ``kproxy.hookspecs``).
"""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
