"""The node's own state kproxy touches besides its tables: conntrack, interface addresses, kube-proxy's leftovers."""
