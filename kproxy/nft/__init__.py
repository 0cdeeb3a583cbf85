"""nftables objects and the kernel edge: the transaction model, netlink encoding, the backends.

``objects`` holds the plain values (tables, chains, elements, transactions);
``backend`` sends transactions to the kernel (netlink, libnftables for the
skeleton) and reads kproxy's tables back; ``fake`` does the same in memory.
"""
