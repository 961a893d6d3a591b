"""Names of the objects the built-in plugins share in kproxy's main tables.

The built-ins cooperate through these names (for example, the masquerade plugin adds its
source check to the service-maps plugin's ``services`` chain when offered it, and
service-maps jumps to the masquerade plugin's ``mark-for-masquerade``). A plugin that
replaces a built-in keeps the names it is expected to provide.
"""

# service-maps
SERVICES = "services"  # nat: dispatch of new connections to a service destination
CLUSTER_IPS = "cluster-ips"  # set of every active ClusterIP
SERVICE_IPS = "service-ips"  # map addr . proto . port : verdict
NO_ENDPOINT_SERVICES = "no-endpoint-services"  # map addr . proto . port : drop/reject verdict
BACKENDS = "backends"  # map addr . proto . port . index : endpoint addr . port
REJECT_CHAIN = "reject-chain"

# masquerade
MARK_FOR_MASQUERADE = "mark-for-masquerade"
MASQUERADING = "masquerading"
HAIRPIN = "hairpin"  # set of endpoint . endpoint address pairs
