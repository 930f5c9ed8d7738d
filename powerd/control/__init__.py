"""The control loop: numba kernels over arrays (kernels.py) and the policy around them."""

from __future__ import annotations

from powerd.control.policy import Controller, GroupSpec, Policy

__all__ = ["Controller", "GroupSpec", "Policy"]
