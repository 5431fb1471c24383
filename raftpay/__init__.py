"""raftpay: a payment ledger that replicates itself with Raft and needs no outside coordinator.

The payment path reads top to bottom through client -> wire -> server -> node -> ledger.
"""

__version__ = "0.1.0"
