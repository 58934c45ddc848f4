"""Adapters that plug lowrank_ops into other libraries.

Submodules are imported on demand (``import lowrank_ops.integrations.peft``), so the
libraries they target stay optional dependencies.
"""
