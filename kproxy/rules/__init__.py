"""From the model to nftables objects: endpoint selection, the compiler, the table assembly and the planner. Pure.

Data flow: ``endpoints`` (which endpoints a port uses here) -> ``compiler``
(a Service's chains and elements) -> ``assembly`` (the desired table, one
Service at a time) -> ``plan`` (the transaction from the kernel's table to
the desired one). ``skeleton`` reads ``rules/kproxy.nft`` once; ``explain``
says where a packet goes and why.
"""
